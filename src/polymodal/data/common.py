"""What the data-set builders share: the cache folder, fixed splits, atomic writes, the
licence README, progress bars and the summary.

A built data set is a folder the trainer reads:

    out/
      images/...                one file per picture (RGB PNG)
      captions.jsonl            one line per (picture, caption): {"image": "images/x.png",
                                "text": "...", "split": "train" | "test", ...metadata}
      README.md                 what it holds, where it came from and under which licence

Every builder is deterministic (same arguments, same bytes) and resumable: pictures are
written atomically and skipped when they exist, captions.jsonl and README.md are rewritten
atomically at the end.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from PIL import Image, ImageChops

CAPTIONS = "captions.jsonl"
CLIPS = "clips.jsonl"  # the clip sets' lines name `frames`, not an `image`, so the pair reader skips them
BUILD = ".polymodal-build.json"
# what npm and apt print when the registry cannot be reached
OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ETIMEDOUT", "ECONNREFUSED", "ECONNRESET", "ENETUNREACH",
           "Temporary failure resolving", "Could not resolve", "Failed to fetch", "Unable to connect",
           "Network is unreachable", "network request")
TEST_FRACTION = 0.1
ICONIFY_FILES = ("icons.json", "chars.json", "info.json", "package.json")  # of an @iconify-json/* package


class SourceError(RuntimeError):
    """A source could not be fetched or read; the message says what to do instead."""


class SourceUnavailable(SourceError):
    """The registry or tool holding a source cannot be reached (no network, no npm / apt)."""


def check_build(out: Path, builder: str, params: dict) -> None:
    """Refuse to resume into `out` a build whose pictures were made with other arguments;
    record the arguments for the next run otherwise."""
    record = {"builder": builder, **params}
    out.mkdir(parents=True, exist_ok=True)
    path = out / BUILD
    if path.exists():
        before = json.loads(path.read_text(encoding="utf-8"))
        if before != record:
            raise ValueError(f"{out} holds a build made with {before}, not {record}: "
                             "use another folder or delete this one")
        return
    write_atomic(path, (json.dumps(record, sort_keys=True) + "\n").encode("utf-8"))


def cache_dir(cache: str | os.PathLike | None = None) -> Path:
    """`cache`, else $POLYMODAL_CACHE, else ~/.cache/polymodal."""
    if cache is None:
        cache = os.environ.get("POLYMODAL_CACHE") or Path.home() / ".cache" / "polymodal"
    path = Path(cache).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def unit_hash(key: str) -> float:
    """A stable number in [0, 1) for `key` (SHA-256; the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(key: str, *, salt: str, test_fraction: float = TEST_FRACTION) -> str:
    """"test" for about `test_fraction` of keys, fixed by the key alone."""
    return "test" if unit_hash(f"{salt}:{key}") < test_fraction else "train"


def held_out_names(cache: Path) -> set[str]:
    """The names of the emoji the emoji builder holds out (from emoji-datasource, fetched into
    the cache). Builders of other sources put things of those names in their test split."""
    from polymodal.data.emoji import emoji_records, emoji_split

    return {e["name"] for key, e in emoji_records(cache).items() if emoji_split(key) == "test"}


def split_beside(subject: str, held: set[str], *, salt: str) -> str:
    """The split of a subject of a source mixed with emoji and clip art: test when it names a
    held-out emoji (`held`, from `held_out_names`) or held-out clip art (hashed as the clip-art
    builder hashes its subjects), else by its own hash under `salt`."""
    from polymodal.data.clipart import SPLIT_SALT as CLIPART_SALT

    if subject in held or split_of(subject, salt=CLIPART_SALT) == "test":
        return "test"
    return split_of(subject, salt=salt)


def take(keys: Sequence[str], limit: int | None, is_test) -> list[str]:
    """The first `limit` of `keys` (in their order) with both splits in proportion: about
    TEST_FRACTION of them, at least one, from those where `is_test(key)`; all keys if no limit."""
    if limit is None:
        return list(keys)
    test = [k for k in keys if is_test(k)]
    n_test = min(len(test), max(1, round(limit * TEST_FRACTION))) if limit > 1 else 0
    train = [k for k in keys if not is_test(k)][: max(0, limit - n_test)]
    chosen = set(test[:n_test]) | set(train)
    return [k for k in keys if k in chosen]


def dedupe(texts: Iterable[str]) -> list[str]:
    """Lower-case, squeeze spaces, drop empties and repeats; keep the first order."""
    seen, out = set(), []
    for text in texts:
        text = " ".join(str(text).lower().split()).strip(" ,;:")
        if text and text not in seen:
            seen.add(text)
            out.append(text)
    return out


def article(phrase: str) -> str:
    """'an eagle', 'a pumpkin', 'a user', 'buttons' (a plural, by its last letter), 'the flag
    of chad' (kept)."""
    if phrase.startswith(("a ", "an ", "the ")) or phrase[:1].isdigit():
        return phrase
    head = re.split(r" (?:with|of|in|on|and|for|from|at|under|over) ", phrase)[0]  # "face with ... eyes"
    if head.endswith("s") and not head.endswith(("ss", "us", "is", "ys")):
        return phrase
    vowel = phrase[:1] in "aeiou" and not phrase.startswith(("uni", "use", "usu", "uti", "eu", "one"))
    return ("an " if vowel or phrase.startswith(("hour", "honest", "honour", "heir")) else "a ") + phrase


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_png(image: Image.Image, path: Path) -> None:
    """An RGB PNG, written atomically; the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    write_atomic(path, buffer.getvalue())


def on_white(image: Image.Image) -> Image.Image:
    """Composite transparency onto white and return RGB (what load_image would do)."""
    if image.mode == "P" or image.mode in ("LA", "La", "PA", "RGBa") or "A" in image.getbands():
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    lines = (json.dumps(r, ensure_ascii=False, separators=(", ", ": ")) for r in records)
    write_atomic(path, ("\n".join(lines) + "\n").encode("utf-8"))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def track(items: Sequence, description: str, enabled: bool) -> Iterator:
    """`items`, with a rich progress bar when `enabled`."""
    if not enabled or not items:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=len(items))
        for item in items:
            yield item
            bar.advance(task)


def run_tool(args: Sequence[str], *, cwd: Path, what: str) -> subprocess.CompletedProcess:
    """Run an external tool; a missing tool is SourceUnavailable, a failure SourceError."""
    if shutil.which(args[0]) is None:
        raise SourceUnavailable(f"{what}: `{args[0]}` is not installed")
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = " ".join((done.stderr or done.stdout).split())[-600:]
        error = SourceUnavailable if any(m in tail for m in OFFLINE) else SourceError
        raise error(f"{what}: `{' '.join(args)}` failed (exit {done.returncode}): {tail}")
    return done


def iconify_svg(data: dict, icon: dict) -> bytes:
    """A standalone SVG of one icon of an Iconify `icons.json` (`data`): its body in its view box
    (the icon's own size and offset, else the set's; 16 x 16 when neither says), drawn in black
    where it uses currentColor."""
    left, top = icon.get("left", data.get("left", 0)), icon.get("top", data.get("top", 0))
    width, height = icon.get("width", data.get("width", 16)), icon.get("height", data.get("height", 16))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="{left} {top} {width} {height}" color="black">{icon["body"]}</svg>').encode()


def _publish(tmp: Path, folder: Path, marker: str) -> None:
    """Mark a finished unpacking complete and move it to its place in the cache."""
    (tmp / ".complete").write_text(marker + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.replace(folder)


def fetch_npm(package: str, version: str, integrity: str, cache: Path, wanted: Sequence[str]) -> Path:
    """The files of an npm package whose paths start with one of `wanted`, unpacked into the
    cache (fetched with `npm pack` the first time and checked against its pinned integrity)."""
    root = cache / "npm"
    folder = root / f"{package.replace('/', '+')}-{version}"
    if (folder / ".complete").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / f"{folder.name}.tgz"
    if not tarball.exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            run_tool(["npm", "pack", f"{package}@{version}", "--pack-destination", tmp, "--silent"],
                     cwd=Path(tmp), what=f"fetching {package}@{version} from the npm registry")
            got = list(Path(tmp).glob("*.tgz"))
            if len(got) != 1:
                raise SourceError(f"npm pack {package}@{version} left {len(got)} tarballs, expected one")
            got[0].replace(tarball)
    if "sha512-" + base64.b64encode(hashlib.sha512(tarball.read_bytes()).digest()).decode() != integrity:
        tarball.unlink()
        raise SourceError(f"{tarball.name}: integrity does not match the pinned {integrity[:20]}...; "
                          "removed it, run again to fetch it afresh")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{folder.name}-"))
    try:
        with tarfile.open(tarball) as tar:
            members = []
            for m in tar.getmembers():
                name = m.name.split("/", 1)[-1]  # every member sits under "package/"
                if m.isfile() and name.startswith(tuple(wanted)):
                    m.name = name
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        _publish(tmp, folder, f"{package}@{version}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _download_deb(package: str, version: str, pool_url: str, folder: Path) -> Path:
    """`apt-get download` (after `apt-get update` if apt does not know the version and we are
    root), else the Debian pool over HTTP. Returns the .deb inside `folder`."""
    errors = []
    try:
        spec = f"{package}={version}"
        try:
            run_tool(["apt-get", "download", spec], cwd=folder, what=f"apt-get download {spec}")
        except SourceError as e:
            if isinstance(e, SourceUnavailable) or not hasattr(os, "geteuid") or os.geteuid() != 0:
                raise
            run_tool(["apt-get", "update"], cwd=folder, what="apt-get update")
            run_tool(["apt-get", "download", spec], cwd=folder, what=f"apt-get download {spec}")
        return next(folder.glob(f"{package}_*.deb"))
    except (SourceError, StopIteration) as e:
        errors.append(str(e) or "apt-get download left no .deb")
    try:
        path = folder / pool_url.rsplit("/", 1)[-1]
        with urllib.request.urlopen(pool_url, timeout=60) as response, open(path, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        return path
    except OSError as e:
        errors.append(f"{pool_url}: {e}")
    raise SourceUnavailable(f"cannot fetch {package} {version}: " + "; ".join(errors))


def _ar_data_tar(deb: Path) -> tarfile.TarFile:
    """The data.tar.* member of a .deb (an `ar` archive), for machines without dpkg."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise SourceError(f"{deb}: not a Debian package")
        while header := f.read(60):
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            data = f.read(size + size % 2)[:size]
            if name.startswith("data.tar"):
                return tarfile.open(fileobj=io.BytesIO(data))
    raise SourceError(f"{deb}: no data.tar member")


def fetch_deb(package: str, version: str, sha256: str, pool_url: str, cache: Path, keep: dict[str, str]) -> Path:
    """A Debian package's files, unpacked into the cache once: fetched with `apt-get download`
    (no root install; straight from the Debian pool over HTTP when apt is missing or fails),
    checked against its pinned SHA-256 and unpacked with `dpkg -x` (or a small ar + tar reader
    where dpkg is missing). `keep` maps paths under the package's usr/share to the names they
    get in the returned folder."""
    root = cache / "apt"
    folder = root / f"{package}-{version.split(':')[-1]}"
    if (folder / ".complete").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    deb = root / pool_url.rsplit("/", 1)[-1]
    if not deb.exists():
        with tempfile.TemporaryDirectory(dir=root) as tmp:
            _download_deb(package, version, pool_url, Path(tmp)).replace(deb)
    if file_digest(deb) != sha256:
        deb.unlink()
        raise SourceError(f"{deb.name}: SHA-256 does not match the pinned {sha256[:16]}...; "
                          "removed it, run again to fetch it afresh")
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{package}-"))
    try:
        unpacked = tmp / "x"
        if shutil.which("dpkg"):
            run_tool(["dpkg", "-x", str(deb), str(unpacked)], cwd=tmp, what=f"dpkg -x {deb.name}")
        else:
            with _ar_data_tar(deb) as tar:
                tar.extractall(unpacked, filter="data")
        share = unpacked / "usr" / "share"
        for source, name in keep.items():
            (share / source).replace(tmp / name)
        shutil.rmtree(unpacked)
        _publish(tmp, folder, f"{package} {version}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def crop_white(image: Image.Image, margin: float = 0.04) -> Image.Image:
    """Cut white margins down to `margin` of the content's longer side (a small drawing on a big
    empty page fills the frame)."""
    box = ImageChops.difference(image, Image.new("RGB", image.size, "white")).convert("L").point(
        lambda v: 255 if v > 8 else 0).getbbox()
    if box is None:
        return image
    pad = round(margin * max(box[2] - box[0], box[3] - box[1]))
    box = (max(0, box[0] - pad), max(0, box[1] - pad), min(image.width, box[2] + pad),
           min(image.height, box[3] + pad))
    return image.crop(box) if box != (0, 0, *image.size) else image


def load_drawing(path: Path, size: int | None, *, min_side: int = 24) -> Image.Image:
    """A picture file as RGB on white, its white margins cropped, downscaled to fit `size` (never
    enlarged). A picture of over 2**24 pixels is reduced before it is composited (Pillow resizes
    RGBA premultiplied), so it never needs three full copies; one whose content is under
    `min_side` pixels is refused (ImageError)."""
    from polymodal.processing.image import ImageError, load_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's hard cap still holds
        try:
            with Image.open(path) as raw:
                if raw.width * raw.height <= (1 << 24):
                    image = load_image(path)
                else:
                    raw.load()
                    image = raw if raw.mode in ("RGBA", "LA", "RGB", "L") else raw.convert("RGBA")
                    if size:
                        image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
                    image = on_white(image)
        except Image.DecompressionBombError as e:
            raise ImageError(f"{path.name}: too many pixels to decode ({e})") from None
    image = crop_white(image)
    if max(image.size) < min_side:
        raise ImageError(f"{path.name}: {image.width} x {image.height} pixels is too small to use")
    if size and max(image.size) > size:
        image.thumbnail((size, size), Image.Resampling.LANCZOS)
    return image


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def summarise(records: Sequence[dict], *, by: Sequence[str] = ("category",)) -> dict:
    """Counts of distinct images (or clips) per split and per metadata field, and captions."""
    first: dict[str, dict] = {}
    for r in records:
        first.setdefault(r.get("image") or r["frames"][0], r)
    summary = {
        "images": len(first),
        "captions": len(records),
        "splits": dict(sorted(Counter(r["split"] for r in first.values()).items())),
    }
    for field in by:
        counts = Counter(str(r.get(field)) for r in first.values())
        summary[field] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return summary


def write_readme(out: Path, *, title: str, about: str, sources: Sequence[dict], summary: dict,
                 notes: Sequence[str] = (), layout: Sequence[str] | None = None) -> None:
    """README.md: what the set holds, each source with its version and licence, and counts.

    A source is {"name", "licence"} and optionally "version", "url", "terms" and "files".
    The text depends only on its arguments, so a rerun writes the same bytes.
    """
    lines = [f"# {title}", "", about.strip(), "", "## Sources and licences", ""]
    for s in sources:
        version = f" {s['version']}" if s.get("version") else ""
        url = f" <{s['url']}>" if s.get("url") else ""
        lines.append(f"- **{s['name']}**{version}{url}: {s['licence']}.")
        if s.get("terms"):
            lines.append(f"  {s['terms']}")
        if s.get("files"):
            lines.append(f"  Files: {s['files']}")
    lines += ["", "Generated captions and split assignments are part of polymodal (Apache-2.0); the "
              "pictures keep the licence of their source above.", "", "## Layout", ""]
    lines += [f"- {item}" for item in layout or (
        f"`{CAPTIONS}`: one JSON object per line: `image` (path relative to this folder), `text` "
        "(one caption), `split` (`train` or `test`) and metadata; a picture has several lines.",
        "`images/`: RGB PNG files.")]
    lines += ["", "## Counts", "", "```",
              json.dumps(summary, indent=2, ensure_ascii=False), "```", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    write_atomic(out / "README.md", "\n".join(lines).encode("utf-8"))
