"""`finetune report`: the page, its charts, the recipe differences, the data summary, the merges, and the W&B
logging, on runs really trained (and merged) by finetune."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from finetune.cli import main
from finetune.report import report


def _quiet(*a, **k):
    pass


@pytest.fixture(scope="module")
def two_run_report(tmp_path_factory, wandb_run, plain_run):
    out = tmp_path_factory.mktemp("report") / "ab"
    return report([str(wandb_run), str(plain_run)], str(out), wandb=False, echo=_quiet)


def test_page_embeds_every_chart_and_the_pngs_are_written(two_run_report):
    page = two_run_report.page.read_text()
    names = sorted(p.stem for p in two_run_report.plots)
    assert names == ["eval", "grad_norm", "loss", "lr", "merges", "peak_mem", "tokens_per_s"]
    embedded = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(embedded) == len(names)
    on_disk = {base64.b64encode(p.read_bytes()).decode() for p in two_run_report.plots}
    assert set(embedded) == on_disk  # the page is self-contained: the same images, no links to files
    for png in two_run_report.plots:
        image = mpimg.imread(png)
        assert image.shape[0] > 300 and image.shape[1] > 500, png  # a drawn chart, not an empty canvas
        assert image[..., :3].std() > 0.05, png
    assert "<script" not in page and "http" not in page  # opens offline, as one file


def test_page_names_both_runs_and_the_recipe_differences(two_run_report, wandb_run, plain_run):
    page = two_run_report.page.read_text()
    assert "run-a" in page and "run-b" in page
    diff = re.search(r"<h2>Recipe differences</h2>.*?</table>", page, re.S).group(0)
    for key, a, b in (("train.learning_rate", "0.01", "0.003"), ("lora.r", "8", "4"), ("lora.alpha", "16", "8"),
                      ("tracking.wandb.project", "qlora-tests", "—")):
        assert re.search(rf"<td>{re.escape(key)}</td><td>{re.escape(a)}</td><td>{re.escape(b)}</td>", diff), key
    assert "<td>output.dir</td>" not in diff  # differs by construction, says nothing


def test_data_summary_comes_from_the_runs_data_report(two_run_report, wandb_run):
    data = json.loads((wandb_run / "data_report.json").read_text())
    train = data["splits"]["train"]
    assert train["examples"] == 64 and train["label_tokens"] > 0
    page = two_run_report.page.read_text()
    section = re.search(r"<h2>Data</h2>.*?<h2>", page, re.S).group(0)
    row = rf"<td>train</td><td>[^<]*train.jsonl</td><td class='num'>64</td><td class='num'>64</td><td>none</td>" \
          rf"<td class='num'>64</td><td class='num'>{train['truncated']}</td><td class='num'>{train['tokens']}</td>" \
          rf"<td class='num'>{train['label_tokens']}</td>"
    assert re.search(row, section), section[:2000]


def test_merges_are_found_under_the_run_and_charted(two_run_report, wandb_run):
    fidelity = json.loads((wandb_run / "merges" / "bf16" / "merge_report.json").read_text())["fidelity"]
    run_a = next(r for r in two_run_report.runs if r.name == "run-a")
    assert [m.label for m in run_a.merges] == ["bf16 (bf16)"]
    page = two_run_report.page.read_text()
    merges = re.search(r"<h2>Merges</h2>.*?</table>", page, re.S).group(0)
    assert f"{fidelity['retention']:.4g}" in merges and f"{fidelity['kl_adapter_merged']:.4g}" in merges


def test_merges_elsewhere_are_matched_to_their_run_by_adapter(tmp_path, wandb_run, plain_run):
    other = tmp_path / "merged"
    other.mkdir()
    (other / "a-copy").symlink_to(wandb_run / "merges" / "bf16", target_is_directory=True)
    result = report([str(plain_run), str(wandb_run)], str(tmp_path / "out"), merges=[str(other)], wandb=False,
                    echo=_quiet)
    by_name = {r.name: r for r in result.runs}
    assert len(by_name["run-a"].merges) == 1 and not by_name["run-b"].merges  # the same merge is counted once
    only_b = report([str(plain_run)], str(tmp_path / "out-b"), merges=[str(other)], wandb=False, echo=_quiet)
    assert only_b.notes and "none of the runs" in only_b.notes[0]


def test_default_output_is_the_runs_report_folder_and_is_replaced_whole(plain_run, capsys):
    assert main(["report", str(plain_run), "--no-wandb"]) == 0
    assert (plain_run / "report" / "report.html").is_file()
    (plain_run / "report" / "stale.png").write_bytes(b"")
    assert main(["report", str(plain_run), "--no-wandb"]) == 0
    assert not (plain_run / "report" / "stale.png").exists()
    assert not list(plain_run.glob(".report.report-*"))  # no temporary folder left behind
    assert "report: " in capsys.readouterr().out


def _wandb_records(run_dir: Path) -> list[dict]:
    exe = Path(sys.executable).with_name("wandb")
    out = subprocess.run([str(exe), "leet", "inspect", "--json", str(run_dir)], capture_output=True, text=True,
                         check=True, timeout=120).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_charts_and_merge_table_are_logged_to_the_runs_wandb_run(tmp_path, wandb_run, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_id = (wandb_run / "wandb_run_id").read_text().strip()
    before = set((wandb_run / "wandb").glob("offline-run-*"))
    result = report([str(wandb_run)], str(tmp_path / "out"), echo=_quiet)
    assert result.wandb_runs == [run_id]
    new = sorted(set((wandb_run / "wandb").glob("offline-run-*")) - before)
    assert len(new) == 1 and new[0].name.endswith(run_id)  # the training run's id: `wandb sync` appends to it
    history = [r["history"]["item"] for r in _wandb_records(new[0]) if r["type"] == "history"]
    # W&B's history flattens a logged media object into 'key._type', 'key.path', ...
    logged = {}
    for row in history:
        for k, v in row.items():
            if k.startswith("report/"):
                key, field = k.rsplit(".", 1)
                logged.setdefault(key, {})[field] = v
    charts = {"report/" + p.stem for p in result.plots}
    assert charts | {"report/merge_reports"} == set(logged) and "report/merges" in charts
    for key in charts:
        assert logged[key]["_type"] == "image-file" and (new[0] / "files" / logged[key]["path"]).is_file(), key
    assert logged["report/merge_reports"]["_type"] == "table-file"
    table = json.loads((new[0] / "files" / logged["report/merge_reports"]["path"]).read_text())
    fidelity = json.loads((wandb_run / "merges" / "bf16" / "merge_report.json").read_text())["fidelity"]
    row = dict(zip(table["columns"], table["data"][0]))
    assert row["format"] == "bf16 (bf16)" and row["retention"] == pytest.approx(fidelity["retention"])
    assert row["kl_adapter_merged"] == pytest.approx(fidelity["kl_adapter_merged"])


# ----------------------------------------------------------------------------------- bad input: one line, exit 2


def _error(argv, capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_missing_run_is_one_line(tmp_path, capsys):
    assert "no such run directory" in _error(["report", str(tmp_path / "nope")], capsys)


def test_run_without_metrics_is_one_line(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert "no metrics.jsonl" in _error(["report", str(tmp_path / "run")], capsys)
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "tokens_per_s": 5.0}\n')
    assert "no logged metrics" in _error(["report", str(tmp_path / "run")], capsys)
    # Damaged lines are skipped and counted (#23): the report of the rest is written, with a note.
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1}\n'
                                                    '{"step": "3", "loss": 1}\n{"step": 4, "loss": "NaN"}\n')
    assert main(["report", str(tmp_path / "run"), "--no-wandb", "-q"]) == 0
    assert f"note: {tmp_path / 'run' / 'metrics.jsonl'}: 3 lines or values skipped" in capsys.readouterr().out


def test_bad_smoothing_and_merges_dir_are_one_line(plain_run, tmp_path, capsys):
    assert "--smooth 1.5" in _error(["report", str(plain_run), "--smooth", "1.5"], capsys)
    assert "no merge_report.json" in _error(["report", str(plain_run), "--merges", str(tmp_path)], capsys)
