"""Choose the grammar engine: llguidance, xgrammar and outlines-core on the real Granite tokenizer.

For each engine and each JSON schema below, with the checkpoint's own
tokenizer.json (100352 ids, special tokens included):

* bridge: building the engine's view of the tokenizer (once per tokenizer);
* compile: schema -> a matcher ready for its first mask (fresh each walk, no
  engine-side cache), and the first mask on top of it (both are paid before a
  constrained answer's first token);
* mask: computing the next-token bitmask into a preallocated buffer, at every
  later step of a valid instance of the schema (its canonical tokenization),
  over several walks: median, 99th percentile and worst step in the thread's
  CPU time (what the engine costs; on a shared machine the wall time of a
  10 us call also catches the scheduler's time slices), and the worst wall time;
* answer: compile + every mask of one walk, the whole cost of constraining
  that answer (median over walks);
* check: every token of the valid instance must be allowed by the mask before
  it, and EOS at its end; and the invalid instance (same shape, one value the
  schema forbids: a bound, an enum, a pattern, a type, a required field,
  maxItems) must be refused somewhere, or the engine silently ignores that
  part of the schema.

The schemas are the structured-output tests' own (tests/structured_cases.py).

    python benchmarks/grammar_engines.py [--engines llguidance,xgrammar,outlines-core]
        [--walks 7] [--json benchmarks/results/grammar_engines_cpu.json]

Each engine is optional: one that does not import is reported and skipped.
xgrammar needs torch (its bitmask is a torch tensor); outlines-core's JSON goes
through a regex, so schemas it cannot turn into one are reported as failures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tokenizer"

# The schemas of the structured-output tests (tests/structured_cases.py): flat records,
# nesting, arrays, enums, bounded numbers, optional fields, $ref, patterns, a top-level
# array; each with a valid instance and an invalid one that differs in what the schema
# constrains.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from structured_cases import SCHEMAS

# --------------------------------------------------------------------------
# The three engines behind one interface: bridge(hf) -> engine; engine.compile(schema)
# -> matcher; matcher.fill(buffer); matcher.consume(token)
# --------------------------------------------------------------------------


class LLGuidance:
    name = "llguidance"

    def __init__(self, hf, eos: int):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        self.tok = llguidance.hf.from_tokenizer(hf, eos_token=eos)
        self.version = llguidance.__version__

    def compile(self, schema: dict):
        grammar = self.ll.LLMatcher.grammar_from_json_schema(schema)
        matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return self._Matcher(matcher)

    class _Matcher:
        def __init__(self, m):
            self.m = m

        def fill(self, buf: np.ndarray) -> None:
            self.m.unsafe_compute_mask_ptr(buf.ctypes.data, buf.nbytes)

        def consume(self, token: int) -> bool:
            return self.m.consume_token(token)


class XGrammar:
    name = "xgrammar"

    def __init__(self, hf, eos: int):
        import xgrammar

        self.xgr = xgrammar
        self.info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=len(hf), stop_token_ids=[eos]
        )
        self.version = _dist_version("xgrammar")

    def compile(self, schema: dict):
        # A fresh compiler each time: its cache would make repeats free.
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        compiled = compiler.compile_json_schema(json.dumps(schema))
        return self._Matcher(self.xgr.GrammarMatcher(compiled))

    class _Matcher:
        def __init__(self, m):
            import torch

            self.m = m
            self.torch = torch

        def fill(self, buf: np.ndarray) -> None:
            self.m.fill_next_token_bitmask(self.torch.from_numpy(buf).view(1, -1))

        def consume(self, token: int) -> bool:
            return self.m.accept_token(token)


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, hf, eos: int):
        import outlines_core

        self.oc = outlines_core
        # Token bytes exactly as the byte-level BPE decodes them (llguidance's decoder
        # of the same tokenizer.json is used only to read them out); special tokens
        # other than EOS are left out, as outlines does.
        import llguidance.hf

        ll = llguidance.hf.from_tokenizer(hf, eos_token=eos)
        table: dict[bytes, list[int]] = {}
        for i in range(ll.vocab_size):
            if i == eos or ll.is_special_token(i):
                continue
            table.setdefault(ll.decode_bytes([i]), []).append(i)
        self.vocab = outlines_core.Vocabulary(eos, table)
        self.version = _dist_version("outlines-core")

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self._Matcher(self.oc.Guide(self.oc.Index(regex, self.vocab)))

    class _Matcher:
        def __init__(self, g):
            self.g = g

        def fill(self, buf: np.ndarray) -> None:
            self.g.write_mask_into(buf.ctypes.data, buf.size, 4)

        def consume(self, token: int) -> bool:
            self.g.advance(token, return_tokens=False)
            return True


ENGINES = {e.name: e for e in (LLGuidance, XGrammar, OutlinesCore)}


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def allowed(buf: np.ndarray, token: int) -> bool:
    return bool((int(buf[token // 32]) >> (token % 32)) & 1)


def accepts(matcher, tokens: list[int], eos: int, buf: np.ndarray) -> bool:
    """Whether the matcher lets ``tokens`` then EOS through, mask by mask."""
    for token in [*tokens, eos]:
        matcher.fill(buf)
        if not allowed(buf, token):
            return False
        if token != eos and not matcher.consume(token):
            return False
    return True


def measure(
    engine, schema: dict, tokens: list[int], bad_tokens: list[int], eos: int, vocab: int,
    walks: int,
) -> dict:  # fmt: skip
    buf = np.zeros((vocab + 31) // 32, dtype=np.int32)
    compile_s, first_s, answer_s = [], [], []
    wall: list[float] = []  # every mask after the first, wall time
    cpu: list[float] = []  # the same, this thread's CPU time (free of the scheduler's slices)
    rejected = None
    for _ in range(walks):
        t0 = time.perf_counter()
        m = engine.compile(schema)
        compile_s.append(time.perf_counter() - t0)
        spent = compile_s[-1]
        for i, token in enumerate([*tokens, eos]):
            t0, c0 = time.perf_counter(), time.thread_time()
            m.fill(buf)
            c1, t1 = time.thread_time(), time.perf_counter()
            spent += t1 - t0
            if i == 0:
                first_s.append(t1 - t0)
            else:
                wall.append(t1 - t0)
                cpu.append(c1 - c0)
            if not allowed(buf, token):
                rejected = f"token {i} ({token}) not in the mask"
                break
            if token != eos and not m.consume(token):
                rejected = f"token {i} ({token}) refused by consume"
                break
        answer_s.append(spent)
        if rejected:
            break
    refuses_invalid = not accepts(engine.compile(schema), bad_tokens, eos, buf)
    cpu_us, wall_us = sorted(s * 1e6 for s in cpu), sorted(s * 1e6 for s in wall)
    return {
        "tokens": len(tokens),
        "accepted": rejected is None,
        "rejected": rejected,
        "refuses_invalid": refuses_invalid,
        "compile_ms_median": statistics.median(compile_s) * 1e3,
        "first_mask_ms_median": statistics.median(first_s) * 1e3,
        "mask_cpu_us_median": statistics.median(cpu_us),
        "mask_cpu_us_p99": cpu_us[min(len(cpu_us) - 1, int(0.99 * len(cpu_us)))],
        "mask_cpu_us_max": cpu_us[-1],
        "mask_wall_us_median": statistics.median(wall_us),
        "mask_wall_us_max": wall_us[-1],
        "mask_steps": len(cpu_us),
        "answer_ms_median": statistics.median(answer_s) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokenizer", default=str(TOKENIZER))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--walks", type=int, default=7, help="compiles and walks per schema")
    ap.add_argument("--json", help="write the results here")
    a = ap.parse_args()

    from granite_mlx.tokenizer import load_tokenizer

    wrapper = load_tokenizer(a.tokenizer)
    hf = wrapper._tokenizer
    eos = wrapper.eos_token_id
    vocab = len(hf)
    instances = {
        name: [hf.encode(json.dumps(x), add_special_tokens=False) for x in (good, bad)]
        for name, (_, good, bad) in SCHEMAS.items()
    }
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, python {sys.version.split()[0]}"
    )
    print(f"tokenizer: {a.tokenizer} ({vocab} ids, EOS {eos})")
    report: dict = {"machine": platform.machine(), "vocab": vocab, "engines": {}}
    for name in a.engines.split(","):
        try:
            t0 = time.perf_counter()
            engine = ENGINES[name](hf, eos)
            bridge = time.perf_counter() - t0
        except ImportError as exc:
            print(f"\n{name}: not available ({exc})")
            report["engines"][name] = {"available": False, "error": str(exc)}
            continue
        print(f"\n{name} {engine.version}: tokenizer bridge {bridge:.2f} s")
        print(f"  {'schema':10s} {'tokens':>6s} {'compile ms':>10s} {'1st mask ms':>11s} "
              f"{'mask CPU us: med':>16s} {'p99':>7s} {'max':>7s} {'max wall us':>11s} "
              f"{'answer ms':>9s}  valid refuses invalid")  # fmt: skip
        rows = {}
        for sname, (schema, _, _) in SCHEMAS.items():
            try:
                good, bad = instances[sname]
                r = measure(engine, schema, good, bad, eos, vocab, a.walks)
            except (ValueError, RuntimeError, TypeError) as exc:  # a schema it cannot compile
                print(f"  {sname:10s} failed: {type(exc).__name__}: {str(exc)[:120]}")
                rows[sname] = {"error": f"{type(exc).__name__}: {exc}"}
                continue
            rows[sname] = r
            print(
                f"  {sname:10s} {r['tokens']:6d} {r['compile_ms_median']:10.2f} "
                f"{r['first_mask_ms_median']:11.3f} {r['mask_cpu_us_median']:16.1f} "
                f"{r['mask_cpu_us_p99']:7.1f} {r['mask_cpu_us_max']:7.1f} "
                f"{r['mask_wall_us_max']:11.1f} {r['answer_ms_median']:9.2f}  "
                f"{'yes' if r['accepted'] else 'NO: ' + r['rejected']:5s} "
                f"{'yes' if r['refuses_invalid'] else 'NO'}"
            )
        ok = [r for r in rows.values() if "error" not in r]
        summary = {
            "available": True,
            "version": engine.version,
            "bridge_s": bridge,
            "schemas": rows,
            "failed_schemas": [s for s, r in rows.items() if "error" in r or not r["accepted"]],
            "ignored_constraints": [
                s for s, r in rows.items() if "error" not in r and not r["refuses_invalid"]
            ],
        }
        if ok:
            summary["compile_ms_median_of_medians"] = statistics.median(
                r["compile_ms_median"] for r in ok
            )
            summary["mask_cpu_us_median_of_medians"] = statistics.median(
                r["mask_cpu_us_median"] for r in ok
            )
            summary["mask_cpu_us_worst"] = max(r["mask_cpu_us_max"] for r in ok)
            summary["answer_ms_median_of_medians"] = statistics.median(
                r["answer_ms_median"] for r in ok
            )
        report["engines"][name] = summary
        print(
            f"  summary: compile median {summary.get('compile_ms_median_of_medians', 0):.2f} ms, "
            f"mask CPU median {summary.get('mask_cpu_us_median_of_medians', 0):.1f} us, worst step "
            f"{summary.get('mask_cpu_us_worst', 0):.0f} us, answer median "
            f"{summary.get('answer_ms_median_of_medians', 0):.2f} ms, "
            f"failed: {summary['failed_schemas'] or 'none'}, "
            f"let an invalid instance through: {summary['ignored_constraints'] or 'none'}"
        )
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
