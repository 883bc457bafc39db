"""The package structure: imports point down the layers, no circles, the model holds no communication."""
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import check_imports  # noqa: E402


def test_the_tree_passes_the_import_rules():
    run = subprocess.run([sys.executable, str(REPO / "tools" / "check_imports.py")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "no circles, every edge points down" in run.stdout


def _tree(tmp_path, files: dict) -> Path:
    root = tmp_path / "megatron"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(text))
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return root


def test_the_checker_finds_circles_upward_edges_and_model_importing_parallel(tmp_path):
    root = _tree(tmp_path, {
        "errors.py": "",
        "optim/a.py": "from megatron.optim import b\n",
        "optim/b.py": "def f():\n    from megatron.optim.a import x  # a local import still counts\n",
        "model/gpt.py": "from megatron.parallel.comm import send\n",
        "parallel/comm.py": "send = None\n",
        "config/schema.py": "from megatron.training.trainer import Trainer\n",
        "training/trainer.py": "Trainer = None\n",
        "stray.py": "",
        "newpkg/x.py": "from megatron.errors import UserError\n",
    })
    problems = check_imports.violations(root)
    text = "\n".join(problems)
    assert "import circle: megatron.optim.a <-> megatron.optim.b" in text
    assert "megatron.model.gpt imports megatron.parallel.comm (megatron.model must not import megatron.parallel)" in text
    assert "megatron.config.schema imports megatron.training.trainer, which is above it" in text
    assert "a module at the top of megatron/" in text and "stray.py" in text
    assert "package megatron.newpkg has no layer" in text
    # model -> parallel is also an upward edge; each finding is one line
    assert len(problems) == 6, problems


def test_the_checker_accepts_downward_and_same_package_edges(tmp_path):
    root = _tree(tmp_path, {
        "errors.py": "",
        "model/gpt.py": "from megatron.model.moe import layer\nfrom megatron.config.schema import Config\n",
        "model/moe/layer.py": "from megatron.errors import UserError\n",
        "config/schema.py": "from megatron.errors import UserError\n",
        "training/trainer.py": "from megatron.model.gpt import GPT\nfrom megatron.parallel.comm import send\n",
        "parallel/comm.py": "import torch\n",
    })
    assert check_imports.violations(root) == []
