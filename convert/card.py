"""The model card (README.md) of a converted checkpoint."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .quality import QualityReport
from .writer import human_size

# IBM releases every Granite 4.0 checkpoint under Apache 2.0; the card says so
# unless the source's own card (or --license) names another license.
DEFAULT_LICENSE = "apache-2.0"


def source_license(src: Path) -> str | None:
    """The `license:` of the source's own model card front matter, if it has one."""
    readme = src / "README.md"
    if not readme.is_file():
        return None
    text = readme.read_text(encoding="utf-8", errors="replace")
    m = re.match(r"^---\n(.*?)\n---", text, re.DOTALL)
    if m is None:
        return None
    lic = re.search(r"^license:\s*(\S+)\s*$", m.group(1), re.MULTILINE)
    return lic.group(1) if lic else None


def hub_repo_of(src: str, folder: Path) -> str | None:
    """The Hub repo a source came from: the id it was given as, or the one a Hub
    cache path (`models--org--name/snapshots/...`) names; None for a plain folder."""
    if not Path(src).expanduser().exists():
        return src
    for part in folder.resolve().parts:
        m = re.match(r"^models--([^/]+?)--(.+)$", part)
        if m:
            return f"{m.group(1)}/{m.group(2)}"
    return None


def model_card(
    *,
    repo_id: str | None,
    local_path: str,
    base_model: str | None,
    license: str | None,
    quantization: str,
    recipe_rows: dict[str, str] | None,
    quality: QualityReport | None,
    size_bytes: int,
    source_bytes: int,
) -> str:
    """README.md: YAML front matter, how to use it, how it was made, its quality."""
    name = repo_id or local_path  # what the usage snippets load
    quantized = not quantization.startswith("unquantized")
    front = ["---", "library_name: mlx", "pipeline_tag: text-generation"]
    front.append(f"license: {license or DEFAULT_LICENSE}")
    if base_model:
        front.append(f"base_model: {base_model}")
        if quantized:
            front.append("base_model_relation: quantized")
    front += ["tags:", "- mlx", "- granite", "- granite-4.0", "- granite-mlx"]
    if quantized:
        front.append("- quantized")
    front.append("---")
    source = (
        f"[{base_model}](https://huggingface.co/{base_model})"
        if base_model
        else "a local checkpoint"
    )
    lines = [
        *front,
        "",
        f"# {Path(name).name}",
        "",
        (
            f"IBM Granite 4.0 converted for [MLX](https://github.com/ml-explore/mlx) from {source} "
            f"with `granite-mlx convert`: {quantization}, {human_size(size_bytes)} of weights "
            f"({size_bytes / source_bytes:.0%} of the source's {human_size(source_bytes)})."
        ),
        "",
        "## Use with granite-mlx",
        "",
        "```bash",
        "pip install granite-mlx",
        f'granite-mlx generate --model {shlex.quote(name)} --prompt "Write a haiku about the sea."',
        f"granite-mlx chat --model {shlex.quote(name)}",
        "```",
        "",
        "```python",
        "from granite_mlx.generate import generate, load",
        "",
        f"model, tokenizer = load({name!r})",
        'messages = [{"role": "user", "content": "Write a haiku about the sea."}]',
        "print(generate(model, tokenizer, messages, max_tokens=128))",
        "```",
        "",
        "The weights use mlx-lm's layout, so `mlx_lm.load` reads them as well:",
        "",
        "```python",
        "from mlx_lm import generate, load",
        "",
        f"model, tokenizer = load({name!r})",
        "```",
    ]
    if recipe_rows:
        lines += ["", "## Quantization", "", "| tensors | precision |", "|---|---|"]
        lines += [f"| {cls} | {what} |" for cls, what in recipe_rows.items()]
        lines += ["", "Norms, conv1d, A_log, D and dt_bias are never quantized."]
    if quality is not None:
        how = quality.compute_dtype  # "as stored", or a dtype both models were cast to
        if how != "as stored":
            how = f"in {how}"
        lines += [
            "",
            "## Quality against the source",
            "",
            (
                f"Measured at conversion time on {quality.note}, both models computed {how}"
                ": per-token KL divergence (source || converted, nats), top-1 agreement of the "
                "next-token argmax, and perplexity on the inputs' next tokens."
            ),
            "",
            quality.table(),
        ]
    return "\n".join(lines) + "\n"
