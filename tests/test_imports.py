"""The run path is torch-free: `kws listen`, `kws serve`, `kws data` and `kws --help` import no
torch, each command's module is imported only when that command runs, and a command that needs
torch where it is not installed says how to install it in one line (exit status 2)."""

import subprocess
import sys

import pytest

from kws.cli import COMMANDS, build_parser


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_run_path_modules_leave_torch_unimported():
    result = python("import sys, kws.cli, kws.listen, kws.serve, kws.export, kws.bench, kws.download, "
                    "kws.synth, app.main\n"
                    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchaudio')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_help_lists_every_command_and_imports_none_of_their_modules():
    result = python("import sys\nfrom kws.cli import main\n"
                    "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
                    "print('MODULES', sorted(m for m in sys.modules if m.startswith(('kws.', 'app', 'torch', 'numpy'))))")
    assert result.returncode == 0, result.stderr
    for name in COMMANDS:
        assert name in result.stdout
    assert result.stdout.split("MODULES")[1].strip() == "['kws.cli', 'kws.errors']"


def test_the_summary_in_help_is_the_one_each_command_registers():
    """COMMANDS' summaries stand in for the modules that are not imported: they must agree
    (a command's help changed in its module must be changed in kws.cli.COMMANDS too)."""
    full = build_parser(list(COMMANDS))
    sub = next(a for a in full._actions if a.dest == "command")
    registered = {a.dest: a.help for a in sub._choices_actions}
    assert registered == {name: summary for name, (_, summary) in COMMANDS.items()}


@pytest.mark.parametrize("argv, needs, install", [
    (["train", "--data", "x"], "kws train", "kws[train]"),
    (["eval", "--data", "x"], "kws eval", "kws[train]"),
    (["eval-stream", "--data", "x"], "kws eval-stream", "kws[train]"),
    (["export", "a.pt", "b.npz"], "reading a PyTorch checkpoint", "kws[train]"),
    (["bench", "model"], "kws bench model", "kws[train]"),
    (["average", "--out", "c.pt", "a.pt", "b.pt"], "kws average", "kws[train]"),
    (["teacher", "train", "--data", "x"], "kws teacher", "kws[distill]")])
def test_a_torch_command_without_torch_says_how_to_install_it(argv, needs, install):
    # None in sys.modules makes `import torch` fail as it does where torch is not installed.
    result = python("import sys\nsys.modules['torch'] = sys.modules['torchaudio'] = None\n"
                    f"from kws.cli import main\nsys.exit(main({argv!r}))")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kws: error: ") and "Traceback" not in result.stderr
    assert lines[0] == f"kws: error: {needs} needs PyTorch, which is not installed: pip install '{install}'"


@pytest.mark.parametrize("action", ["download", "synth"])
def test_the_data_actions_run_without_torch(action, tmp_path):
    """Getting the dataset and rendering speech need no torch: the action runs as far as its
    own check (a folder that cannot be made), not to an install hint."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = python("import sys\nsys.modules['torch'] = sys.modules['torchaudio'] = None\n"
                    "from kws.cli import main\n"
                    f"sys.exit(main(['data', {action!r}, {str(blocker / 'out')!r}]))")
    assert "kws[train]" not in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2 and result.stderr.startswith("kws: error: "), result.stderr


def test_a_checkpoint_without_torch_points_to_kws_export(tiny_edge_model_path):
    result = python("import sys\nsys.modules['torch'] = None\nfrom kws.cli import main\n"
                    f"sys.exit(main(['info', '--model', {str(tiny_edge_model_path)!r}]))")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"kws: error: {tiny_edge_model_path} is a PyTorch checkpoint: "
                                     "convert it with `kws export` where torch is installed "
                                     "(pip install 'kws[train]')")


def test_the_engine_leaves_audio_decoding_unimported_and_keeps_kws_audios_sample_rate():
    """kws.runtime repeats kws.audio's SAMPLE_RATE rather than import it (with soundfile, soxr);
    it imports only the error type and the label checks (kws.labels imports nothing)."""
    result = python("import sys, kws.runtime\n"
                    "print(sorted(m for m in sys.modules if m.split('.')[0] in ('soundfile', 'soxr', 'kws')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['kws', 'kws.errors', 'kws.labels', 'kws.runtime']"
    from kws import audio, runtime
    assert runtime.SAMPLE_RATE == audio.SAMPLE_RATE
