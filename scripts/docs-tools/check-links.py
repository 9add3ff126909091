#!/usr/bin/env python3
"""Checks every link of a built mdBook site: relative links must name a file of the site
and, when they carry a #fragment, an id in that file. External links (http:, https:,
mailto:) are listed, not fetched (CI has no general network access).

Usage: check-links.py BOOK_DIR      exit 1 and one line per broken link
"""
import html.parser
import os
import sys
import urllib.parse


class Page(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.links = []
        self.ids = set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        for attr in ("href", "src"):
            if attr in a and a[attr] is not None and tag in ("a", "img", "script", "link"):
                self.links.append((tag, attr, a[attr]))


def parse(path, cache):
    if path not in cache:
        p = Page()
        with open(path, encoding="utf-8", errors="replace") as f:
            p.feed(f.read())
        cache[path] = p
    return cache[path]


def main():
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    root = os.path.abspath(sys.argv[1])
    cache = {}
    broken = []
    external = set()
    pages = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".html"):
                continue
            page = os.path.join(dirpath, name)
            pages += 1
            rel_page = os.path.relpath(page, root)
            for tag, attr, link in parse(page, cache).links:
                url = urllib.parse.urlsplit(link)
                if url.scheme in ("http", "https", "mailto"):
                    external.add(link)
                    continue
                if url.scheme or link.startswith("//") or link.startswith("javascript:"):
                    continue
                if url.path == "" and url.fragment == "":
                    continue
                if url.path:
                    if url.path.startswith("/"):
                        broken.append(f"{rel_page}: {link}: absolute path (use a relative link)")
                        continue
                    target = os.path.normpath(
                        os.path.join(dirpath, urllib.parse.unquote(url.path)))
                    if os.path.isdir(target):
                        target = os.path.join(target, "index.html")
                else:
                    target = page
                if not target.startswith(root) or not os.path.isfile(target):
                    broken.append(f"{rel_page}: {link}: no such file in the site")
                    continue
                if url.fragment and target.endswith(".html"):
                    frag = urllib.parse.unquote(url.fragment)
                    if frag not in parse(target, cache).ids:
                        broken.append(
                            f"{rel_page}: {link}: no id '{frag}' in {os.path.relpath(target, root)}")
    for b in sorted(set(broken)):
        print(f"broken link: {b}", file=sys.stderr)
    print(f"check-links: {pages} pages, {len(set(broken))} broken links, "
          f"{len(external)} external links (not fetched)")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
