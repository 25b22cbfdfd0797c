"""A loopback HTTP server for the download tests, and archives in the official layouts.

The server serves a dict {file name: bytes} at /<name>, honours Range requests, can cut a
connection after a number of bytes (the first `times` requests of a file), and can answer a file's
first request with a Google-Drive-style confirmation page whose form leads to the file.
"""
from __future__ import annotations

import io
import json
import socket
import tarfile
import threading
import urllib.parse
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from PIL import Image


def png_bytes(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (seed * 37 % 256, seed * 91 % 256, 128)).save(buf, format="PNG")
    return buf.getvalue()


IMG = png_bytes()


def zip_of(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_of(members: dict, mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


class Server:
    def __init__(self):
        self.files: dict = {}
        self.cuts: dict = {}          # name -> [bytes to send before cutting, times left]
        self.confirm: set = set()     # names answered first by a confirmation page
        self.html_only: set = set()   # names that only ever get an HTML page (quota exceeded)
        self.ignore_range = False     # answer every request with the whole file (200)
        self.log: list = []           # (path, Range header)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                name = urllib.parse.unquote(parts.path.rsplit("/", 1)[-1])
                outer.log.append((self.path, self.headers.get("Range")))
                if name in outer.html_only or (name in outer.confirm and query.get("confirm") != "t0k"):
                    page = ("<html><body>Google Drive can't scan this file for viruses." +
                            ("" if name in outer.html_only else
                             f'<form id="download-form" action="/confirmed/{name}" method="get">'
                             f'<input type="hidden" name="id" value="abc"><input type="hidden" name="export" '
                             f'value="download"><input type="hidden" name="confirm" value="t0k">'
                             f'<input type="hidden" name="uuid" value="u-1"></form>') + "</body></html>").encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(page)))
                    self.end_headers()
                    self.wfile.write(page)
                    return
                if name not in outer.files:
                    self.send_error(404)
                    return
                data = outer.files[name]
                start, status = 0, 200
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes=") and not outer.ignore_range:
                    start = int(rng[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    status = 206
                body = data[start:]
                self.send_response(status)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                cut = outer.cuts.get(name)
                if cut and cut[1] > 0:
                    cut[1] -= 1
                    self.wfile.write(body[:cut[0]])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranges(self, name: str) -> list:
        return [r for p, r in self.log if p.endswith("/" + name) and r]


# ---- archives in the official layouts -------------------------------------------------------------
def _domainbed_tree(prefix: str, domains, classes) -> dict:
    return {f"{prefix}/{d}/{c}/img_{i}.png": IMG for d in domains for i, c in enumerate(classes)}


def _split_json() -> bytes:
    return json.dumps({"train": [["a/1.jpg", 0, "a"]], "val": [], "test": [["a/2.jpg", 0, "a"]]}).encode()


def official_files(name: str) -> dict:
    """{file name: bytes} as the official source serves them, for download NAME."""
    from dgclip.data.catalog import get_spec

    spec = get_spec(name) if name in ("pacs", "vlcs", "officehome", "terraincognita", "domainnet", "digits-dg",
                                      "mini-domainnet") else None
    if name == "pacs":
        return {"PACS.zip": zip_of(_domainbed_tree("kfold", spec.domains, spec.classes))}
    if name == "vlcs":
        return {"VLCS.tar.gz": tar_of(_domainbed_tree("VLCS", spec.domains, spec.classes))}
    if name == "officehome":
        return {"office_home.zip": zip_of(_domainbed_tree("OfficeHomeDataset_10072016", spec.domains, spec.classes))}
    if name == "terraincognita":
        cats = list(spec.classes) + ["deer"]  # deer: a class DomainBed leaves out
        images, anns, members = [], [], {}
        for loc in (38, 46, 100, 43, 7):  # 7: a location DomainBed leaves out
            for ci, cat in enumerate(cats):
                iid = f"im{loc}_{ci}"
                images.append({"id": iid, "file_name": f"{iid}.jpg", "location": loc})
                anns.append({"image_id": iid, "category_id": ci})
                members[f"eccv_18_all_images_sm/{iid}.jpg"] = IMG
        categories = [{"id": i, "name": c} for i, c in enumerate(cats)]
        ann_files = {}
        for k, stem in enumerate(("cis_test", "cis_val", "train", "trans_test", "trans_val")):
            part = {"images": images[k::5], "annotations": anns[k::5], "categories": categories}
            ann_files[f"eccv_18_annotation_files/{stem}_annotations.json"] = json.dumps(part).encode()
        return {"eccv_18_all_images_sm.tar.gz": tar_of(members), "eccv_18_annotations.tar.gz": tar_of(ann_files)}
    if name == "domainnet":
        out = {}
        for d in spec.domains:
            tree = {f"{d}/{c}/{d}_001.png": IMG for c in spec.classes}
            tree[f"{d}/{spec.classes[0]}/{d}_dup.png"] = IMG  # listed as a duplicate: deleted
            out[f"{d}.zip"] = zip_of(tree)
        out["domain_net_duplicates.txt"] = "".join(f"{d}/{spec.classes[0]}/{d}_dup.png\n" for d in spec.domains).encode()
        return out
    if name == "digits-dg":
        return {"digits_dg.zip": zip_of({f"digits_dg/{d}/{s}/{c}/00001.png": IMG for d in spec.domains
                                         for s in ("train", "val") for c in spec.classes})}
    if name == "mini-domainnet":
        lines = {d: "".join(f"{d}/{c}/{d}_001.png {i}\n" for i, c in enumerate(spec.classes)) for d in spec.domains}
        return {"splits_mini.zip": zip_of({f"splits_mini/{d}_{s}.txt": lines[d].encode()
                                           for d in spec.domains for s in ("train", "test")})}
    img = IMG
    coop = {
        "caltech101": {"101_ObjectCategories.tar.gz": tar_of({"101_ObjectCategories/accordion/image_0001.jpg": img}),
                       "split_zhou_Caltech101.json": _split_json()},
        "oxford_pets": {"images.tar.gz": tar_of({"images/Abyssinian_1.jpg": img}),
                        "annotations.tar.gz": tar_of({"annotations/list.txt": b"Abyssinian_1 1 1 1\n"}),
                        "split_zhou_OxfordPets.json": _split_json()},
        "stanford_cars": {"cars_train.tgz": tar_of({"cars_train/00001.jpg": img}),
                          "cars_test.tgz": tar_of({"cars_test/00001.jpg": img}),
                          "car_devkit.tgz": tar_of({"devkit/cars_meta.mat": b"MATLAB 5.0"}),
                          "cars_test_annos_withlabels.mat": b"MATLAB 5.0",
                          "split_zhou_StanfordCars.json": _split_json()},
        "oxford_flowers": {"102flowers.tgz": tar_of({"jpg/image_00001.jpg": img}), "imagelabels.mat": b"MATLAB 5.0",
                           "cat_to_name.json": b'{"1": "pink primrose"}',
                           "split_zhou_OxfordFlowers.json": _split_json()},
        "food101": {"food-101.tar.gz": tar_of({"food-101/images/apple_pie/1.jpg": img,
                                               "food-101/meta/classes.txt": b"apple_pie\n"}),
                    "split_zhou_Food101.json": _split_json()},
        "fgvc_aircraft": {"fgvc-aircraft-2013b.tar.gz": tar_of({
            "fgvc-aircraft-2013b/data/images/0034309.jpg": img, "fgvc-aircraft-2013b/data/variants.txt": b"707-320\n",
            **{f"fgvc-aircraft-2013b/data/images_variant_{s}.txt": b"0034309 707-320\n"
               for s in ("train", "val", "test")}})},
        "sun397": {"SUN397.tar.gz": tar_of({"SUN397/a/abbey/sun_a.jpg": img}),
                   "Partitions.zip": zip_of({"ClassName.txt": b"/a/abbey\n", "Training_01.txt": b"/a/abbey/sun_a.jpg\n",
                                             "Testing_01.txt": b"/a/abbey/sun_a.jpg\n"}),
                   "split_zhou_SUN397.json": _split_json()},
        "dtd": {"dtd-r1.0.1.tar.gz": tar_of({"dtd/images/banded/banded_0002.jpg": img, "dtd/labels/train1.txt": b"x\n"}),
                "split_zhou_DescribableTextures.json": _split_json()},
        "eurosat": {"EuroSAT.zip": zip_of({"2750/AnnualCrop/AnnualCrop_1.jpg": img}),
                    "split_zhou_EuroSAT.json": _split_json()},
        "ucf101": {"UCF-101-midframes.zip": zip_of({"UCF-101-midframes/Apply_Eye_Makeup/v_1.jpg": img}),
                   "split_zhou_UCF101.json": _split_json()},
        "imagenetv2": {"imagenetv2-matched-frequency.tar.gz": tar_of(
            {"imagenetv2-matched-frequency-format-val/0/a.jpeg": img}), "classnames.txt": b"n01440764 tench\n"},
        "imagenet_a": {"imagenet-a.tar": tar_of({"imagenet-a/n01498041/a.jpg": img}, "w"),
                       "classnames.txt": b"n01440764 tench\n"},
        "imagenet_r": {"imagenet-r.tar": tar_of({"imagenet-r/n01443537/a.jpg": img}, "w"),
                       "classnames.txt": b"n01440764 tench\n"},
    }
    return coop[name]
