"""python -m sparks_ext demo | summary | bench."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

import sparks_ext
from sparks_ext import __main__ as cli

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_demo_end_to_end(tmp_path):
    out = tmp_path / "digits.spk"
    result = subprocess.run(
        [sys.executable, "-m", "sparks_ext", "demo", "--epochs", "2", "--width", "16", "--quiet",
         "--latency-batch", "32", "--latency-repeats", "3", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stdout + result.stderr
    text = result.stdout
    accuracy = float(re.search(r"test accuracy: ([\d.]+)%", text).group(1))
    assert accuracy > 30  # two epochs already learn digits; ten classes give 10% by chance
    assert "-> OK" in text and "reloaded outputs identical" in text
    assert "bits per binary weight: 0.556 for the indices" in text
    numbers = re.search(r"digits.spk: ([\d,]+) bytes = theoretical ([\d,]+) .* header (\d+) \+ ([\d,]+) ", text)
    size, theoretical, header, rest = (int(g.replace(",", "")) for g in numbers.groups())
    assert size == out.stat().st_size == theoretical + header + rest
    # framing (28 bytes), six int64 BatchNorm counters, at most one rounding byte per tensor
    assert rest <= 28 + 6 * 8 + len(sparks_ext.serialization.read_header(out)["tensors"])
    loaded = sparks_ext.load(out, sparks_ext.models.SmallCNN(conv="sparks", n_codewords=32, width=16))
    assert sum(isinstance(m, sparks_ext.nn.CodebookConv2d) for m in loaded.modules()) == 4
    assert "CodebookConv2d" in text and "OPs = BOPs/64 + FLOPs" in text
    assert re.search(r"latency of SmallCNN, batch 32, \d+ threads, median of 3 rounds after warm-up: "
                     r"float [\d.]+ ms, 1-bit XNOR fused [\d.]+ ms, Sparks n=32 fused [\d.]+ ms", text)
    assert re.search(r"deployed in bfloat16: [\d.]+%", text)


def test_summary_command(capsys):
    assert cli.main(["summary", "--show", "n=16"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ResNet-18 (n=16) summary, input (3, 224, 224)")
    table = {line.split()[0]: line.split() for line in text.splitlines()
             if line.split() and line.split()[0] in ("1-bit", "n=64", "n=32", "n=16")}
    assert [table[k][4] for k in ("1-bit", "n=64", "n=32", "n=16")] == \
        ["1.676e+09", "8.839e+08", "5.014e+08", "2.972e+08"]


def test_bench_runs_the_suite_then_the_report(monkeypatch, capsys, tmp_path):
    calls = []
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    suite = ROOT / "benchmarks"
    code = cli.main(["bench", "--out", str(tmp_path / "out"), "-k", "batch1"])
    if not (suite / "report.py").exists():
        assert code == 2 and calls == [] and "report.py not found" in capsys.readouterr().err
        return
    out = (tmp_path / "out").resolve()
    json = out / "results.json"
    assert code == 0 and calls == [
        ([sys.executable, "-m", "pytest", str(suite), f"--benchmark-json={json}", "-k", "batch1"], ROOT),
        ([sys.executable, str(suite / "report.py"), str(json), "--out", str(out / "RESULTS.md"),
          "--png", str(out / "results.png")], ROOT)]
    assert "the committed benchmarks/RESULTS.md stays as it is" in capsys.readouterr().err
    calls.clear()
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 3)
    assert cli.main(["bench", "--out", str(tmp_path)]) == 3 and len(calls) == 1  # no report when the suite fails
    # Writing into benchmarks/ itself replaces the committed report: it says so.
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: 3)
    cli.main(["bench", "--out", str(suite)])
    assert "this replaces the committed" in capsys.readouterr().err


def test_bench_without_pytest_says_what_to_install(monkeypatch, capsys):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name: None if name == "pytest" else real(name))
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: pytest.fail("ran without pytest"))
    if not (ROOT / "benchmarks" / "report.py").exists():
        pytest.skip("no benchmarks in this install")
    assert cli.main(["bench"]) == 2
    assert "bench needs pytest: pip install pytest pytest-benchmark matplotlib" in capsys.readouterr().err


def test_every_option_has_help_and_a_default_shown(capsys):
    for command in ("demo", "powerlaw", "summary", "bench"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out.split("options:", 1)[1]
        options = re.findall(r"^  (--[a-z-]+)", text, re.MULTILINE)
        assert options, text
        for option in options:
            block = text.split("\n  " + option, 1)[1].split("\n  --", 1)[0]
            assert "(default:" in block, (command, option, block)


def test_usage_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main([])
    with pytest.raises(SystemExit):
        cli.main(["summary", "--show", "n=8"])


def test_powerlaw_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "power_law.png"
    assert cli.main(["powerlaw", "--epochs", "1", "--width", "8", "--quiet", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("layers.")]
    assert [r[0] for r in rows] == ["layers.0.conv1", "layers.0.conv2", "layers.1.conv1", "layers.1.conv2"]
    assert [int(r[1]) for r in rows] == [64, 64, 128, 256]  # kernels per layer at width 8
