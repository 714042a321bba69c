"""Run timm's and transformers' own model tests on models that atmerge patches at construction.

The upstream test files are not part of atmerge: this script prepares them in a scratch folder
outside the repository and runs them with ``atmerge_upstream_plugin`` (same folder), which patches
every model a test creates (see that module).  Results: ``docs/limits.md`` (*Upstream model
tests*).

Upstream files used (2026-12-02):

- timm: ``tests/test_models.py`` of huggingface/pytorch-image-models at commit
  aa4b5850c1543fa488abf260f18390eda46cf85d (run against the installed timm 1.0.31).
- transformers 5.24.0 (the installed version): the common test files shipped in its sdist
  (``pip download --no-deps --no-binary :all: transformers==5.24.0``: ``tests/*.py``), and the
  model test files of huggingface/transformers ``tests/models/vit/test_modeling_vit.py``
  (commit 052b1dcdbe751ed16e8da95261021318f170a130), ``tests/models/deit/test_modeling_deit.py``
  (04ea98d573ce9f3928c226b9e792e5f2c0070ef7) and ``tests/models/dinov2/test_modeling_dinov2.py``
  (0004a3c206a354820edc45954e80b6657f10a7c7), their ``@slow`` integration classes (checkpoint
  downloads) left out.  ``prepare-hf`` writes stand-ins for what the sdist lacks: an empty
  ``ExportTesterMixin`` and ``GenerationTesterMixin`` (exporter and generation tests are not run),
  ``config_common_kwargs`` (the repository's list, kept to the keys a 5.24 config still has), an
  empty ``tests/utils/tiny_model_summary.json`` (pipeline tests skip) and ``src/transformers``
  pointing at the installed package.  Needs ``parameterized`` (and optionally ``pytest-timeout``).

Usage (2 CPU cores: a few minutes each; ``none`` is the unpatched baseline)::

    python bench/upstream/run_upstream_tests.py prepare-timm --mirror PYTORCH_IMAGE_MODELS_GIT_DIR \\
        --dest /tmp/upstream/timm_tests
    python bench/upstream/run_upstream_tests.py timm --tests /tmp/upstream/timm_tests --method tome \\
        -k "vit_tiny or deit_tiny or deit3_small"
    python bench/upstream/run_upstream_tests.py prepare-hf --sdist transformers-5.24.0.tar.gz \\
        --model-tests FOLDER_WITH_vit_deit_dinov2 --dest /tmp/upstream/hf
    python bench/upstream/run_upstream_tests.py hf --tests /tmp/upstream/hf --method tome --r 1

``--out FILE.json`` saves the counts and every failing test with its one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TIMM_COMMIT = "aa4b5850c1543fa488abf260f18390eda46cf85d"
HF_MODEL_TESTS = ("vit/test_modeling_vit.py", "deit/test_modeling_deit.py", "dinov2/test_modeling_dinov2.py")

STAND_INS = {
    "exporters/test_export.py": "class ExportTesterMixin:  # stand-in: exporter tests are not run\n    pass\n",
    "generation/test_utils.py": "class GenerationTesterMixin:  # stand-in: vision encoders do not generate\n    pass\n",
    "utils/test_configuration_utils.py": '''"""Stand-in: config_common_kwargs of the repository's tests/utils/test_configuration_utils.py
(commit 03c3b74168a3317deba1ca82822faf741c6b326d), kept to the keys a transformers 5 config has."""

from transformers import PretrainedConfig

_ALL = {
    "return_dict": False, "output_hidden_states": True, "output_attentions": True, "torchscript": True,
    "dtype": "float16", "use_bfloat16": True, "tf_legacy_loss": True, "pruned_heads": {"a": 1},
    "tie_word_embeddings": False, "is_decoder": True, "cross_attention_hidden_size": 128,
    "add_cross_attention": True, "tie_encoder_decoder": True, "max_length": 50, "min_length": 3,
    "do_sample": True, "early_stopping": True, "num_beams": 3, "num_beam_groups": 3, "diversity_penalty": 0.5,
    "temperature": 2.0, "top_k": 10, "top_p": 0.7, "typical_p": 0.2, "repetition_penalty": 0.8,
    "length_penalty": 0.8, "no_repeat_ngram_size": 5, "encoder_no_repeat_ngram_size": 5, "bad_words_ids": [1, 2, 3],
    "num_return_sequences": 3, "chunk_size_feed_forward": 5, "output_scores": True, "return_dict_in_generate": True,
    "forced_bos_token_id": 2, "forced_eos_token_id": 3, "remove_invalid_values": True,
    "architectures": ["BertModel"], "finetuning_task": "translation", "id2label": {0: "label"},
    "label2id": {"label": "0"}, "tokenizer_class": "BertTokenizerFast", "prefix": "prefix", "bos_token_id": 6,
    "pad_token_id": 7, "eos_token_id": 8, "sep_token_id": 9, "decoder_start_token_id": 10,
    "exponential_decay_length_penalty": (5, 1.01), "suppress_tokens": [0, 1], "begin_suppress_tokens": 2,
    "task_specific_params": {"translation": "some_params"}, "problem_type": "regression",
}
_BASE = vars(PretrainedConfig())
config_common_kwargs = {k: v for k, v in _ALL.items() if k in _BASE}
''',
}


def prepare_timm(mirror: str, dest: Path, commit: str) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    text = subprocess.run(
        ["git", "--git-dir", mirror, "show", f"{commit}:tests/test_models.py"], check=True, capture_output=True
    ).stdout
    (dest / "test_models.py").write_bytes(text)


def prepare_hf(sdist: Path, model_tests: Path, dest: Path) -> None:
    tests = dest / "tests"
    with tarfile.open(sdist) as archive:
        for member in archive.getmembers():
            parts = Path(member.name).parts
            if len(parts) == 3 and parts[1] == "tests" and member.isfile():
                tests.mkdir(parents=True, exist_ok=True)
                (tests / parts[2]).write_bytes(archive.extractfile(member).read())
    for folder in (
        "",
        "models",
        "exporters",
        "generation",
        "utils",
        *(f"models/{p.split('/')[0]}" for p in HF_MODEL_TESTS),
    ):
        (tests / folder).mkdir(parents=True, exist_ok=True)
        (tests / folder / "__init__.py").touch()
    for path, text in STAND_INS.items():
        (tests / path).write_text(text)
    (tests / "utils" / "tiny_model_summary.json").write_text("{}")
    for path in HF_MODEL_TESTS:
        shutil.copy(model_tests / path, tests / "models" / path)
    import transformers

    (dest / "src").mkdir(exist_ok=True)
    link = dest / "src" / "transformers"
    if not link.exists():
        link.symlink_to(Path(transformers.__file__).parent)


def run(kind: str, tests: Path, method: str, r: int, keyword: str | None, out: str | None) -> int:
    env = dict(os.environ, ATMERGE_UPSTREAM_METHOD=method, ATMERGE_UPSTREAM_R=str(r), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    targets = ["test_models.py"] if kind == "timm" else [f"tests/models/{p}" for p in HF_MODEL_TESTS]
    command = [sys.executable, "-m", "pytest", "-c", os.devnull, "--rootdir", str(tests), "-p", "no:cacheprovider"]
    command += ["-p", "atmerge_upstream_plugin", "-W", "ignore", "-q", "-rfE", "--tb=line", *targets]
    if keyword:
        command += ["-k", keyword]
    lines = []
    with subprocess.Popen(
        command, cwd=tests, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as job:
        for line in job.stdout:  # shown as it comes, kept for the summary
            print(line, end="", flush=True)
            lines.append(line)
    stdout = "".join(lines)
    summary = re.findall(r"^=* ?(.*(?:passed|failed|error).*) in [\d.]+s", stdout, re.M)
    failures = re.findall(r"^((?:SUB)?FAILED\S*|ERROR) (\S+)(?: - (.*))?$", stdout, re.M)
    if out:
        record = {
            "command": sys.argv,
            "pytest": command,
            "method": method,
            "r": r,
            "summary": summary[-1] if summary else None,
            "failures": [{"kind": kind, "test": t, "reason": why} for kind, t, why in failures],
        }
        Path(out).write_text(json.dumps(record, indent=1) + "\n")
    return job.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare-timm")
    p.add_argument("--mirror", required=True, help="a pytorch-image-models git directory")
    p.add_argument("--commit", default=TIMM_COMMIT)
    p.add_argument("--dest", type=Path, required=True)
    p = sub.add_parser("prepare-hf")
    p.add_argument("--sdist", type=Path, required=True)
    p.add_argument("--model-tests", type=Path, required=True, help="folder holding vit/, deit/, dinov2/ test files")
    p.add_argument("--dest", type=Path, required=True)
    for kind in ("timm", "hf"):
        p = sub.add_parser(kind)
        p.add_argument("--tests", type=Path, required=True)
        p.add_argument("--method", choices=("none", "tome", "atm"), default="tome")
        p.add_argument("--r", type=int, default=2 if kind == "timm" else 1)
        p.add_argument("-k", dest="keyword")
        p.add_argument("--out")
    args = parser.parse_args()
    if args.command == "prepare-timm":
        prepare_timm(args.mirror, args.dest, args.commit)
        return 0
    if args.command == "prepare-hf":
        prepare_hf(args.sdist, args.model_tests, args.dest)
        return 0
    return run(args.command, args.tests, args.method, args.r, args.keyword, args.out)


if __name__ == "__main__":
    sys.exit(main())
