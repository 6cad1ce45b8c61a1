"""
Get raw text into data/<dataset>/docs.jsonl, one JSON document per line:
{"text": ..., "source": ...} plus "title", "author", "lines" for poems (the SFT step
builds its questions from those), and docs.meta.json saying where it came from and how it
was converted (prepare.py copies that into its meta.json).

  python data/fetch_data.py fortunes-zh                 # the default where installed (Debian fortunes-zh)
  python data/fetch_data.py embedded                    # the corpus committed in assets/embedded/ (no apt needed)
  python data/fetch_data.py chinese-poetry              # download the MIT chinese-poetry JSON files
                                                        # (traditional characters → simplified with OpenCC t2s;
                                                        #  --keep_traditional to keep them as published)
  python data/fetch_data.py chinese-poetry --mirror ../shared/data/chinese-poetry --collections tangshi300 songci300
  python data/fetch_data.py local --input notes.txt corpus/ --name mytext
"""
import argparse
import gzip
import hashlib
import http.client
import json
import random
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tqdm import tqdm  # noqa: E402

from data_utils import UserError, atomic_write, invalid_unicode, read_jsonl, read_lines, run_cli, write_json  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent
# public-domain classics from chinese-poetry (MIT), simplified: assets/embedded/README.md
EMBEDDED = DATA_DIR.parent / "assets" / "embedded" / "classics.jsonl.gz"
FORTUNES_DIR = Path("/usr/share/games/fortunes")
FORTUNES_FILES = ("tang300", "song100", "chinese")  # 唐诗三百首, 宋词一百首, modern Chinese sayings
UPSTREAM = "https://raw.githubusercontent.com/chinese-poetry/chinese-poetry/{ref}/{path}"

# chinese-poetry collections: name -> file paths in the upstream repository
COLLECTIONS = {
    "tangshi300": ["全唐诗/唐诗三百首.json"],
    "songci300": ["宋词/宋词三百首.json"],
    "shijing": ["诗经/shijing.json"],
    "chuci": ["楚辞/chuci.json"],
    "lunyu": ["论语/lunyu.json"],
    "sishu": ["四书五经/daxue.json", "四书五经/mengzi.json", "四书五经/zhongyong.json"],
    "caocao": ["曹操诗集/caocao.json"],
    "nalan": ["纳兰性德/纳兰性德诗集.json"],
    "shuimo": ["水墨唐诗/shuimotangshi.json"],
    "huajianji": [f"五代诗词/huajianji/huajianji-{j}-juan.json" for j in [*range(1, 10), "x"]],
    "nantang": ["五代诗词/nantang/poetrys.json"],
    "yuanqu": ["元曲/yuanqu.json"],
    "qianjiashi": ["蒙学/qianjiashi.json"],
    "guwenguanzhi": ["蒙学/guwenguanzhi.json"],
    "mengxue": [f"蒙学/{n}.json" for n in ("sanzijing-new", "qianziwen", "dizigui", "zengguangxianwen")],
    "songci": [f"宋词/ci.song.{i}.json" for i in range(0, 22000, 1000)] + ["宋词/ci.song.2019y.json"],
    "tang": [f"全唐诗/poet.tang.{i}.json" for i in range(0, 58000, 1000)],
}
ANSI = re.compile(r"\x1b\[[0-9;]*m?|\x1b")  # colour codes, also the malformed ones in `chinese`


def poem_doc(title, author, lines, source):
    """A poem as a document: 《title》, 作者:author, then its lines."""
    head = [f"《{title}》"] + ([f"作者:{author}"] if author else [])
    return {"text": "\n".join(head + lines), "source": source, "title": title, "author": author, "lines": lines}


# ---------------------------------------------------------------------------- fortunes-zh
def parse_fortune(entry, source):
    """tang300/song100 entries are 《title》 / 作者:author / lines; the rest is plain text."""
    lines = [ln.strip() for ln in entry.strip("\n").split("\n")]
    title = re.match(r"^(?:题目[:：])?《(.+?)》", lines[0]) if lines else None
    author = re.match(r"^作者[:：]\s*([^（(]+)", lines[1]) if len(lines) > 2 else None
    if source != "chinese" and title and author:
        return poem_doc(title.group(1), author.group(1).strip(), [ln for ln in lines[2:] if ln], source)
    return {"text": entry.strip("\n"), "source": source}


def fetch_fortunes(args):
    docs = []
    for name in FORTUNES_FILES:
        path = Path(args.fortunes_dir) / name
        if not path.exists():
            raise UserError(f"{path} not found: install the Debian package fortunes-zh "
                            f"(sudo apt-get install -y fortunes-zh) or pass --fortunes_dir")
        text = ANSI.sub("", path.read_text(encoding="utf-8"))
        docs += [parse_fortune(e, name) for e in re.split(r"^%$", text, flags=re.M) if e.strip()]
    return docs


# ------------------------------------------------------------------------- chinese-poetry
def download(url, dest, retries=4):
    """Download url to dest with a progress bar, resuming a partial .part file and
    retrying with back-off; the final name appears only when the file is complete."""
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                if have and r.status != 206:  # server ignored the range: start over
                    have = 0
                total = int(r.headers.get("Content-Length", 0)) + have
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total or None, initial=have, unit="B", unit_scale=True,
                        desc=dest.name, leave=False) as bar:
                    while chunk := r.read(1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
            if total and part.stat().st_size != total:
                raise ConnectionError(f"got {part.stat().st_size} of {total} bytes")
            part.replace(dest)
            return
        except urllib.error.HTTPError as e:
            if e.code == 416:  # range past the end: the .part file is already complete
                part.replace(dest)
                return
            if e.code == 404 or attempt == retries:
                raise UserError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as e:
            if attempt == retries:
                raise UserError(f"{url}: cannot download ({getattr(e, 'reason', e)}); check the network "
                                f"or use --mirror DIR with a local copy of chinese-poetry") from None
        time.sleep(2 ** attempt)


def records_to_docs(records, source, book_author=""):
    """chinese-poetry records → documents. Fields differ by collection: the title is
    title/rhythmic/chapter, the lines paragraphs/content/para. A book of sections (蒙学:
    千家诗, 古文观止, 弟子规) nests records in "content"; they take the book's author unless
    they name their own ("（唐）孟浩然", "先秦：左丘明" → 孟浩然, 左丘明)."""
    docs = []
    for r in records if isinstance(records, list) else [records]:
        if not isinstance(r, dict):
            continue
        nested = r.get("content")
        if isinstance(nested, list) and nested and isinstance(nested[0], dict):
            author = r.get("author") if isinstance(r.get("author"), str) else book_author
            docs += records_to_docs(nested, source, author)
            continue
        lines = r.get("paragraphs") or r.get("content") or r.get("para") or []
        lines = (
            [lines] if isinstance(lines, str) else [ln.strip() for ln in lines if isinstance(ln, str) and ln.strip()]
        )
        title = r.get("title") or r.get("rhythmic") or r.get("chapter") or ""
        if r.get("rhythmic") and r.get("title") and not r["title"].startswith(r["rhythmic"]):  # 花间集 has both
            title = f"{r['rhythmic']}·{r['title']}"
        author = r.get("author") if isinstance(r.get("author"), str) else book_author
        author = re.sub(r"^\s*[（(][^）)]*[）)]|^[^：:]*[：:]", "", author or "").strip()
        if lines and isinstance(title, str):
            docs.append(poem_doc(title, author, lines, source))
    return docs


def to_simplified(docs):
    """全唐诗 and others are published in traditional characters (帝京篇: 函谷壯皇居) while the
    SFT questions and most users write simplified: convert every field with OpenCC t2s."""
    try:
        import opencc
    except ImportError:
        raise UserError(
            "the opencc package is missing: pip install -r requirements.txt (or pass --keep_traditional)"
        ) from None
    t2s = opencc.OpenCC("t2s").convert
    for d in docs:
        for key in ("text", "title", "author"):
            if d.get(key):
                d[key] = t2s(d[key])
        if "lines" in d:
            d["lines"] = [t2s(ln) for ln in d["lines"]]
    return f"OpenCC {getattr(opencc, '__version__', '')} t2s".replace("  ", " ")


def fetch_chinese_poetry(args):
    names = args.collections or list(COLLECTIONS)
    unknown = [n for n in names if n not in COLLECTIONS]
    if unknown:
        raise UserError(f"unknown collection(s) {', '.join(unknown)}; choose from {', '.join(COLLECTIONS)}")
    raw_dir = Path(args.out_dir or DATA_DIR / "chinese-poetry") / "raw"
    docs, bad = [], []
    paths = [(n, p) for n in names for p in COLLECTIONS[n]]
    for name, rel in tqdm(paths, desc="chinese-poetry files", unit="file"):
        if args.mirror:
            src = Path(args.mirror) / rel
            if not src.exists():
                raise UserError(f"{src} not found in the mirror folder {args.mirror}")
        else:
            src = raw_dir / rel
            if not src.exists():
                download(UPSTREAM.format(ref=args.ref, path=urllib.request.quote(rel)), src)
        try:
            records = json.loads(src.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserError(
                f"{src}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start}); delete it to download it again"
            ) from None
        except json.JSONDecodeError as e:
            raise UserError(f"{src}:{e.lineno}: bad JSON ({e.msg}); delete it to download it again") from None
        except (RecursionError, ValueError):
            raise UserError(f"{src}: bad JSON (nested too deeply, or a number too long)") from None
        valid = []
        for i, r in enumerate(records if isinstance(records, list) else [records]):
            if problem := invalid_unicode(r):  # text that is not valid Unicode: skipped, counted
                bad.append(f"{src}: record {i + 1}: {problem}")
            else:
                valid.append(r)
        docs += records_to_docs(valid, name)
    if bad:
        print(f"skipped {len(bad)} malformed record(s), first: {bad[0]}")
    by_collection = {}
    for d in docs:
        by_collection.setdefault(d["source"], []).append(d)
    if args.max_per_collection:  # a seeded sample of the large collections (songci: 21k ci)
        rng = random.Random(args.seed)
        by_collection = {
            n: rng.sample(ds, args.max_per_collection) if len(ds) > args.max_per_collection else ds
            for n, ds in by_collection.items()
        }
    return [d for ds in by_collection.values() for d in ds]


def clean_poetry(docs):
    """The same poem in two collections (宋词三百首 is part of 宋词) once, the first copy; and
    no text with a character the digital edition could not encode (U+FFFD, or a private-use
    code point standing for a missing glyph): a model would learn to write them."""
    seen, kept, unreadable = set(), [], 0
    for d in docs:
        if any(c == "\ufffd" or "\ue000" <= c <= "\uf8ff" for c in d["text"]):
            unreadable += 1
        elif d["text"] not in seen:
            seen.add(d["text"])
            kept.append(d)
    print(
        f"kept {len(kept):,} of {len(docs):,} documents: {len(docs) - len(kept) - unreadable:,} duplicates, "
        f"{unreadable:,} with unreadable characters (U+FFFD, private use) left out"
    )
    return kept


# ------------------------------------------------------------------------------ embedded
def sha256_of(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fetch_embedded(args):
    """The corpus committed with the project: documents as chinese-poetry's fetch writes
    them (title, author, lines), already simplified, gzipped."""
    with gzip.open(EMBEDDED, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------- local
def fetch_local(args):
    if not args.input:
        raise UserError("local needs --input FILE_OR_FOLDER [...] (.txt or .jsonl files)")
    files = []
    for item in map(Path, args.input):
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.suffix in (".txt", ".jsonl"))
        elif item.exists():
            files.append(item)
        else:
            raise UserError(f"{item} not found")
    docs, bad = [], []
    for path in files:
        if path.suffix == ".jsonl":
            records, bad_lines = read_jsonl(path, strict=args.strict)
            for lineno, r in records:
                if isinstance(r, dict) and isinstance(r.get("text"), str) and r["text"].strip():
                    docs.append({"text": r["text"], "source": path.name})
                elif args.strict:
                    raise UserError(f'{path}:{lineno}: expected an object with a non-empty "text" string')
                else:
                    bad.append(f"{path}:{lineno}")
            bad += bad_lines
        else:
            lines, bad_bytes = read_lines(path, strict=args.strict)
            text = "\n".join(t for _, t in lines if t is not None)  # a line that is not UTF-8: reported, skipped
            bad += bad_bytes
            parts = text.split(args.txt_sep) if args.txt_sep else [text]
            docs += [{"text": p.strip("\n"), "source": path.name} for p in parts if p.strip()]
    if bad:
        print(f"skipped {len(bad)} malformed record(s), first: {bad[0]}")
    return docs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["fortunes-zh", "embedded", "chinese-poetry", "local"])
    parser.add_argument("--out_dir", help="where docs.jsonl goes (default data/<dataset> or data/<name>)")
    parser.add_argument("--fortunes_dir", default=str(FORTUNES_DIR))
    parser.add_argument("--mirror", help="read chinese-poetry from this local copy instead of the network")
    parser.add_argument(
        "--collections", nargs="+", help=f"chinese-poetry subsets (default all): {' '.join(COLLECTIONS)}"
    )
    parser.add_argument("--ref", default="master", help="chinese-poetry git ref to download")
    parser.add_argument(
        "--max_per_collection",
        type=int,
        help="chinese-poetry: a seeded sample of at most this many documents of each collection",
    )
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--input", nargs="+", help="local .txt/.jsonl files or folders")
    parser.add_argument("--name", default="custom", help="dataset name for local input")
    parser.add_argument("--txt_sep", help="split .txt files into documents on this string (default: one per file)")
    parser.add_argument("--strict", action="store_true", help="fail on the first malformed record")
    parser.add_argument(
        "--keep_traditional",
        action="store_true",
        help="chinese-poetry: keep traditional characters (default: OpenCC t2s to simplified)",
    )
    args = parser.parse_args()

    fetch = {
        "fortunes-zh": fetch_fortunes,
        "embedded": fetch_embedded,
        "chinese-poetry": fetch_chinese_poetry,
        "local": fetch_local,
    }[args.dataset]
    docs = fetch(args)
    if not docs:
        raise UserError("no documents found")
    conversion = None
    if args.dataset == "chinese-poetry" and not args.keep_traditional:
        conversion = to_simplified(docs)
    if args.dataset == "chinese-poetry":
        docs = clean_poetry(docs)
    out_dir = Path(args.out_dir or DATA_DIR / (args.name if args.dataset == "local" else args.dataset))
    atomic_write(
        out_dir / "docs.jsonl", lambda f: f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), mode="w"
    )
    poems = sum("lines" in d for d in docs)
    chars = sum(len(d["text"]) for d in docs)
    source = {
        "fortunes-zh": lambda: str(args.fortunes_dir),
        "local": lambda: args.input,
        "embedded": lambda: f"{EMBEDDED.relative_to(DATA_DIR.parent)} (sha256 {sha256_of(EMBEDDED)})",
        "chinese-poetry": lambda: args.mirror or UPSTREAM.format(ref=args.ref, path=""),
    }[args.dataset]()
    write_json(
        out_dir / "docs.meta.json",
        {
            "dataset": args.dataset,
            "source": source,
            "collections": args.collections if args.dataset == "chinese-poetry" else None,
            "max_per_collection": args.max_per_collection if args.dataset == "chinese-poetry" else None,
            "conversion": conversion or ("OpenCC t2s, when it was built" if args.dataset == "embedded" else None),
            "documents": len(docs),
            "poems": poems,
            "characters": chars,
        },
    )
    print(
        f"wrote {len(docs):,} documents ({poems:,} poems, {chars:,} characters) to {out_dir / 'docs.jsonl'}"
        + (f", converted to simplified characters ({conversion})" if conversion else "")
    )


if __name__ == "__main__":
    run_cli(main)
