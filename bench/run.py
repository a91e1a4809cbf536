"""Every speed benchmark, polymodal against transformers in one process each, written into BENCHMARKS.md.

    .venv/bin/python bench/run.py                   # about 5 minutes on 2 idle cores
    .venv/bin/python bench/run.py --full            # the issue's sizes (10,000 captions, more repeats)
    .venv/bin/python bench/run.py --quick           # smallest sizes, for a machine busy with other work
    .venv/bin/python bench/run.py --only image text --no-write

Runs each bench script in its own process (so one's threads and caches do not colour the
next), prints its output as it comes, then replaces the block between the two markers in
BENCHMARKS.md with: the machine, its load average before and after, every command with its
full output, and a table of the ratios against the goals of issue 8. The rest of the file
(hand-written sections) is kept. A benchmark whose correctness check fails exits non-zero;
run.py reports that and exits non-zero too.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- bench/run.py: begin -->", "<!-- bench/run.py: end -->"


def benches(size: str) -> dict[str, list[str]]:
    """The command lines at each size: quick (a loaded machine), default (< 10 min on 2 idle cores), full."""
    pick = lambda quick, default, full: {"quick": quick, "default": default, "full": full}[size]  # noqa: E731
    out = {
        "image": ["image_embed.py", "--batch", "1", "32", "--repeats", pick("2", "3", "7"), "--int8"],
        "text": ["text_embed.py", "--captions", pick("300", "1000", "10000"), "--repeats", pick("1", "2", "2")],
        "caption": ["caption.py", "--batch", *pick(["1"], ["1", "8"], ["1", "8"]), "--repeats", pick("1", "2", "3")],
        "train": ["train_throughput.py", "--batch", pick("8", "16", "32"), "--repeats", pick("1", "2", "3")],
        "limits": ["limits.py"],  # what bounds the batch-1 and captioning ratios: bandwidth, small products
    }
    if (HERE / "index_pipeline.py").exists():  # another engineer's: end-to-end indexing against embedding alone
        out["index"] = ["index_pipeline.py", "--images", pick("64", "160", "600"), "--repeats", pick("1", "2", "3")]
    return out


def _num(pattern: str, text: str) -> float | None:
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def goals(outputs: dict[str, str]) -> list[tuple[str, str, str, str]]:
    """(what, goal, measured, met) for every goal of issue 8 whose benchmark ran."""
    rows = []

    def row(what, goal, value, target, fmt="{:.2f}x"):
        if value is None:
            return
        met = "-" if target is None else "yes" if value >= target else "no"
        rows.append((what, goal, fmt.format(value), met))

    img = outputs.get("image", "")
    row("image embedding, batch 32, fp32", ">= 1.0x", _num(r"batch\s+32 fp32 .*?reference ([\d.]+)x", img), 1.0)
    row("image embedding, batch 32, share of the fp32 matmul peak", ">= 90%",
        _num(r"batch\s+32 fp32 .*?= (\d+)% of the fp32", img), 90, "{:.0f}%")
    row("image embedding, batch 1, fp32", ">= 1.3x", _num(r"batch\s+1 fp32 .*?reference ([\d.]+)x", img), 1.3)
    row("image embedding, batch 32, --int8 against the fp32 reference", ">= 1.6x",
        _num(r"batch\s+32 int8 .*?reference ([\d.]+)x", img), 1.6)
    row("int8 embedding cosine to fp32 (lowest, batch 32)", ">= 0.99",
        _num(r"batch\s+32 int8 .*?min cosine ([\d.]+)", img), 0.99, "{:.4f}")
    row("text embedding, mixed-length captions", ">= 2x", _num(r"reference ([\d.]+)x", outputs.get("text", "")), 2.0)
    cap = outputs.get("caption", "")
    row("captioning tokens/s, batch 1", ">= 2x", _num(r"batch 1: .*?reference ([\d.]+)x", cap), 2.0)
    row("captioning tokens/s, batch 8", ">= 2x", _num(r"batch 8: .*?reference ([\d.]+)x", cap), 2.0)
    row("contrastive training samples/s", "(measured)", _num(r"reference ([\d.]+)x", outputs.get("train", "")), None)
    return rows


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) + " (1, 5, 15 min)"


def report(outputs: dict[str, str], commands: dict[str, str], size: str, started: float, load_before: str,
           done: bool) -> str:
    """The block between the markers: machine, load, the goals table, every command and its output."""
    import torch

    minutes = (time.time() - started) / 60
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    status = f"{minutes:.1f} min in all" if done else f"UNFINISHED: {len(outputs)} benchmarks so far, {minutes:.1f} min"
    text = [BEGIN, "", f"## Measured by `python bench/run.py{'' if size == 'default' else ' --' + size}`", "",
            f"{when}; {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, fp32 unless marked; {status}. "
            f"Before: {load_before}; after: {load()}.", "",
            "| goal (issue 8) | target | measured | met |", "| --- | --- | --- | --- |"]
    text += [f"| {what} | {goal} | {value} | {met} |" for what, goal, value, met in goals(outputs)]
    for name, out in outputs.items():
        text += ["", f"`{commands[name]}`", "", "```", out, "```"]
    return "\n".join([*text, "", END])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="the issue's sizes: 10,000 captions, more repeats")
    ap.add_argument("--quick", action="store_true", help="the smallest sizes, for a machine busy with other work")
    ap.add_argument("--only", nargs="+", help="run only these: image text caption train index")
    ap.add_argument("--out", type=Path, default=HERE.parent / "BENCHMARKS.md")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = ap.parse_args()

    size = "full" if args.full else "quick" if args.quick else "default"
    todo = {k: v for k, v in benches(size).items() if not args.only or k in args.only}
    started, load_before = time.time(), load()
    print(f"{load_before}", flush=True)
    outputs, commands, failed = {}, {}, []
    for name, argv in todo.items():
        commands[name] = "python bench/" + " ".join(argv)
        print(f"\n$ {commands[name]}", flush=True)
        t0 = time.time()
        proc = subprocess.Popen([sys.executable, str(HERE / argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, cwd=HERE.parent,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})
        lines = []
        for line in proc.stdout:
            print(line, end="", flush=True)
            lines.append(line)
        proc.wait()
        keep = [x for x in lines if "Warning" not in x and not x.startswith("  ")]  # library warnings
        outputs[name] = "".join(keep).strip() + f"\n({time.time() - t0:.0f} s)"
        if proc.returncode:
            failed.append(name)
            outputs[name] += f"\nFAILED: exit code {proc.returncode}"
        done = len(outputs) == len(todo)
        if done:
            print(f"\n{load()}; {(time.time() - started) / 60:.1f} min in all", flush=True)
        block = report(outputs, commands, size, started, load_before, done)
        if done:
            print("\n" + block)
        if not args.no_write:  # after every benchmark, so a run cut short still leaves its results
            old = args.out.read_text() if args.out.exists() else "# Benchmarks\n"
            if BEGIN in old and END in old:
                new = old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):]
            else:
                new = old.rstrip("\n") + "\n\n" + block + "\n"
            args.out.write_text(new)
            print(f"wrote {args.out}", flush=True)
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
