"""Per-GPU copies of the model repository: the same config.pbtxt files, instance groups rewritten.

The model repository under `tritonserver/model_repository/` is the one the server tests load, with CPU
instance groups. On a GPU host the deployment serves a copy of it in which only `instance_group` differs:

    python -m caphuman.tritonserver.deploy_configs --gpus 4 --out /tmp/caphuman/model_repository

Every top-level `instance_group` of every model's config.pbtxt becomes one group per GPU,
`{ count: C kind: KIND_GPU gpus: [ g ] }`. C is 1 unless `--count N` (every model) or `--count MODEL=N` says
otherwise: the CPU configs' counts are chosen for the 2-core test machines, not for a GPU. Every other
byte of the file (comments included) is kept as it was, and every other file of the repository (model.py,
version folders) is copied unchanged. `--keep-cpu NAME` leaves a model's groups as they are.

A small parser of the protobuf text format that Triton's configs use comes with it, so tests can check that
the generated configs equal the originals field by field except for the instance groups.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

MARKER = ".caphuman-deploy-configs"   # written into --out, so a later run may replace what it made
DEFAULT_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
FIELD = "instance_group"


class ConfigError(ValueError):
    """A config.pbtxt that this tool cannot read, or arguments it cannot honour."""


# -- protobuf text format (the subset Triton's model configs use) ------------------------------------------

class Ident(str):
    """An enum value or bool written bare (KIND_GPU, true)."""


class Num(str):
    """A number, kept as written."""


@dataclass
class Token:
    kind: str      # 'ident', 'string', 'num', or the punctuation character itself
    text: str      # the source text (strings: the decoded value)
    start: int
    end: int


_TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<num>[-+]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)[fF]?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[{}\[\]:,;<>])
""", re.VERBOSE)

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"'}


def _decode_string(raw: str) -> str:
    body, out, i = raw[1:-1], [], 0
    while i < len(body):
        c = body[i]
        if c == "\\" and i + 1 < len(body):
            out.append(_ESCAPES.get(body[i + 1], body[i + 1]))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def tokenize(text: str) -> list[Token]:
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            line = text.count("\n", 0, pos) + 1
            raise ConfigError(f"line {line}: cannot read {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        if kind == "string":
            tokens.append(Token("string", _decode_string(m.group()), m.start(), m.end()))
        elif kind == "punct":
            tokens.append(Token(m.group(), m.group(), m.start(), m.end()))
        elif kind != "ws":
            tokens.append(Token(kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str):
        self.tokens = tokenize(text)
        self.i = 0

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self, kind: str | None = None) -> Token:
        tok = self.peek()
        if tok is None or (kind is not None and tok.kind != kind):
            raise ConfigError(f"expected {kind or 'a token'}, got {tok.text if tok else 'end of file'!r}")
        self.i += 1
        return tok

    def fields(self, close: str | None) -> tuple[dict, list]:
        """Fields until `close` (or the end): ({name: [values]}, [(name, start, end)] of each field)."""
        out: dict[str, list] = {}
        spans = []
        while True:
            tok = self.peek()
            if tok is None:
                if close is not None:
                    raise ConfigError(f"missing {close!r}")
                return out, spans
            if tok.kind == close:
                return out, spans
            name = self.take("ident")
            values = self.field_value()
            end = self.tokens[self.i - 1].end
            while self.peek() is not None and self.peek().kind in (",", ";"):
                self.i += 1
            out.setdefault(name.text, []).extend(values)
            spans.append((name.text, name.start, end))

    def field_value(self) -> list:
        tok = self.peek()
        if tok is not None and tok.kind == ":":
            self.i += 1
            tok = self.peek()
        if tok is None:
            raise ConfigError("a field has no value")
        if tok.kind == "[":
            self.i += 1
            items = []
            while self.peek() is not None and self.peek().kind != "]":
                items.append(self.value())
                if self.peek() is not None and self.peek().kind == ",":
                    self.i += 1
            self.take("]")
            return items
        return [self.value()]

    def value(self):
        tok = self.take()
        if tok.kind in ("{", "<"):
            close = "}" if tok.kind == "{" else ">"
            msg, _ = self.fields(close)
            self.take(close)
            return msg
        if tok.kind == "string":
            # adjacent string literals concatenate, as in protobuf
            text = tok.text
            while self.peek() is not None and self.peek().kind == "string":
                text += self.take().text
            return text
        if tok.kind == "num":
            return Num(tok.text)
        if tok.kind == "ident":
            return Ident(tok.text)
        raise ConfigError(f"unexpected {tok.text!r}")


def parse(text: str) -> dict:
    """A config.pbtxt as {field: [values]}; messages are dicts of the same shape, list syntax is flattened."""
    p = _Parser(text)
    out, _ = p.fields(None)
    return out


def top_level_spans(text: str) -> list[tuple[str, int, int]]:
    """(field name, start offset, end offset) of each top-level field, comments excluded."""
    p = _Parser(text)
    _, spans = p.fields(None)
    return spans


def format_value(value, indent: str = "") -> str:
    if isinstance(value, dict):
        inner = indent + "  "
        lines = [f"{inner}{name}: {format_value(v, inner)}" if not isinstance(v, dict)
                 else f"{inner}{name} {format_value(v, inner)}"
                 for name, vs in value.items() for v in vs]
        return "{\n" + "\n".join(lines) + f"\n{indent}}}"
    if isinstance(value, (Ident, Num)):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    raise TypeError(f"cannot format {value!r}")


# -- the rewrite -----------------------------------------------------------------------------------------

def gpu_groups(groups: list[dict], gpus: list[int], count: int = 1) -> list[dict]:
    """One group per (original group, GPU): KIND_GPU, gpus [g], `count` instances; other fields kept."""
    if not gpus:
        raise ConfigError("no GPUs given")
    groups = groups or [{}]   # no instance_group in the file: Triton's default, one instance
    out = []
    for group in groups:
        for g in gpus:
            new = {}
            if "name" in group:
                new["name"] = [f"{group['name'][0]}_gpu{g}"]
            new["count"] = [Num(str(count))]
            new["kind"] = [Ident("KIND_GPU")]
            new["gpus"] = [Num(str(g))]
            for key, vals in group.items():
                if key not in ("name", "count", "kind", "gpus"):
                    new[key] = vals
            out.append(new)
    return out


def format_instance_groups(groups: list[dict]) -> str:
    items = []
    for group in groups:
        parts = []
        for key, vals in group.items():
            if key == "gpus":
                parts.append("gpus: [ " + ", ".join(str(v) for v in vals) + " ]")
            else:
                parts.extend(f"{key}: {format_value(v)}" if not isinstance(v, dict) else f"{key} {format_value(v)}"
                             for v in vals)
        items.append("  { " + " ".join(parts) + " }")
    return f"{FIELD} [\n" + ",\n".join(items) + "\n]"


def rewrite_config(text: str, gpus: list[int], count: int = 1) -> str:
    """The same config text with its top-level instance groups replaced by per-GPU KIND_GPU groups."""
    spans = [s for s in top_level_spans(text) if s[0] == FIELD]
    groups = parse(text).get(FIELD, [])
    new = format_instance_groups(gpu_groups(groups, gpus, count))
    if not spans:
        return text.rstrip("\n") + "\n" + new + "\n"
    out, pos = [], 0
    for n, (_, start, end) in enumerate(spans):
        out.append(text[pos:start])
        if n == 0:
            out.append(new)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def parse_gpus(spec: str) -> list[int]:
    """'4' -> [0, 1, 2, 3]; '0,2' -> [0, 2]."""
    spec = spec.strip()
    try:
        if "," in spec:
            gpus = [int(x) for x in spec.split(",") if x.strip()]
        else:
            gpus = list(range(int(spec)))
    except ValueError:
        raise ConfigError(f"--gpus takes a count (4) or a list of device ids (0,2), got {spec!r}") from None
    if not gpus or any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise ConfigError(f"--gpus needs at least one GPU and distinct non-negative ids, got {spec!r}")
    return gpus


def parse_counts(specs: list[str]) -> dict[str, int]:
    """['2', 'identity=3'] -> {'*': 2, 'identity': 3}: instances per GPU, for every model or one."""
    counts: dict[str, int] = {}
    for spec in specs:
        name, _, n = spec.rpartition("=")
        try:
            value = int(n)
        except ValueError:
            raise ConfigError(f"--count takes N or MODEL=N, got {spec!r}") from None
        if value < 1:
            raise ConfigError(f"--count must be at least 1, got {spec!r}")
        counts[name.strip() or "*"] = value
    return counts


def generate(src: Path, out: Path, gpus: list[int], counts: dict[str, int] | None = None,
             keep_cpu: tuple[str, ...] = ()) -> list[Path]:
    """Copy the repository `src` to `out` with per-GPU instance groups. Returns the rewritten configs.

    counts: instances per GPU by model name, '*' for the rest (default 1)."""
    counts = dict(counts or {})
    src, out = Path(src).resolve(), Path(out).resolve()
    configs = sorted(src.glob("*/config.pbtxt"))
    if not configs:
        raise ConfigError(f"{src} holds no <model>/config.pbtxt: not a model repository")
    unknown = (set(keep_cpu) | set(counts) - {"*"}) - {c.parent.name for c in configs}
    if unknown:
        raise ConfigError(f"--keep-cpu/--count name models that are not in {src}: {sorted(unknown)}")
    if any(n < 1 for n in counts.values()):
        raise ConfigError(f"instance counts must be at least 1, got {counts}")
    if out == src or src in out.parents:
        raise ConfigError(f"--out {out} must lie outside the source repository {src}")
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file()):
            raise ConfigError(f"--out {out} exists and was not made by this tool; give an empty or new folder")
        shutil.rmtree(out)
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    written = []
    for cfg in configs:
        if cfg.parent.name in keep_cpu:
            continue
        dst = out / cfg.parent.name / "config.pbtxt"
        count = counts.get(cfg.parent.name, counts.get("*", 1))
        dst.write_text(rewrite_config(cfg.read_text(), gpus, count))
        written.append(dst)
    (out / MARKER).write_text(f"generated from {src} for GPUs {gpus}\n")
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m caphuman.tritonserver.deploy_configs",
                                 description="Copy the model repository with one KIND_GPU instance group per GPU.")
    ap.add_argument("--gpus", required=True, help="GPU count (4: GPUs 0..3) or comma-separated device ids (0,2)")
    ap.add_argument("--out", required=True, help="folder for the generated repository (replaced if this tool made it)")
    ap.add_argument("--model-repository", default=str(DEFAULT_REPOSITORY), help="source repository")
    ap.add_argument("--count", action="append", default=[],
                    help="instances per GPU: N for every model, or MODEL=N (repeatable; default 1)")
    ap.add_argument("--keep-cpu", default="", help="comma-separated models whose instance groups stay as they are")
    args = ap.parse_args(argv)
    try:
        keep = tuple(n.strip() for n in args.keep_cpu.split(",") if n.strip())
        written = generate(Path(args.model_repository), Path(args.out), parse_gpus(args.gpus),
                           parse_counts(args.count), keep)
    except (ConfigError, OSError) as e:
        print(f"deploy_configs: error: {e}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
