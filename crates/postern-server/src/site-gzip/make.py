#!/usr/bin/env python3
"""Writes the gzipped pages the website sends to clients that accept gzip.

Debian's nginx (`gzip on`, level 1) compresses text/html with zlib, sizing the window and
memLevel to the body (ngx_http_gzip_filter_module). Python's zlib is the same zlib, so these
bytes are nginx's: the lab test `lookalike` compares them, and site.rs's unit test checks
that each decompresses to its page. Run from this directory after changing a page:
`python3 make.py`.
"""
import zlib

SERVER = "nginx/1.22.1"
PADDING = "<!-- a padding to disable MSIE and Chrome friendly error page -->\r\n"


def nginx_gzip(body: bytes) -> bytes:
    wbits, memlevel = 15, 8
    # As ngx_http_gzip_filter_module sizes them for a body of known length.
    while len(body) < (1 << (wbits - 1)) - 262 and wbits > 9:
        wbits -= 1
        if memlevel > 1:
            memlevel -= 1
    z = zlib.compressobj(1, zlib.DEFLATED, wbits + 16, memlevel)
    return z.compress(body) + z.flush()


def error_page(line: str, msie: bool) -> bytes:
    page = (
        f"<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n"
        f"<center><h1>{line}</h1></center>\r\n<hr><center>{SERVER}</center>\r\n"
        "</body>\r\n</html>\r\n"
    )
    return (page + (PADDING * 6 if msie else "")).encode()


pages = {
    "index.html.gz": open("../site/index.html", "rb").read(),
    "about.html.gz": open("../site/about.html", "rb").read(),
    "404.html.gz": error_page("404 Not Found", False),
    "404-msie.html.gz": error_page("404 Not Found", True),
}
for name, body in pages.items():
    with open(name, "wb") as f:
        f.write(nginx_gzip(body))
