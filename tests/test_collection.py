"""Collections without Ray: what a folder, a glob or a list holds, and `run` over them in this process
(--no-ray, or Ray not installed): outputs equal to running each file alone, results tables, resume, faults."""

from __future__ import annotations

import sys

import pytest
from collection_media import decoded, make_collection, partials, write_clip

from realtime_cam.cli import main
from realtime_cam.collection import discover, is_collection
from realtime_cam.collection.results import read_table
from realtime_cam.errors import SourceError


def rels(items):
    return [item.rel for item in items]


# ----------------------------------------------------------------------------- what a collection holds
def test_a_folder_a_glob_and_a_list_expand_to_media_files_with_their_relative_paths(tmp_path):
    root = make_collection(tmp_path / "in")
    assert rels(discover(str(root))) == ["clips/clip-0.mp4", "clips/clip-1.mp4", "photos/photo-0.jpg",
                                         "photos/photo-1.jpg"]  # notes.txt is neither: skipped
    assert rels(discover(str(root / "*" / "*.jpg"))) == ["photos/photo-0.jpg", "photos/photo-1.jpg"]
    assert rels(discover(str(root / "**" / "clip-1.mp4"))) == ["clips/clip-1.mp4"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# my set\n\nin/clips\n{root / 'photos' / 'photo-1.jpg'}\nin/photos/*-0.jpg\n")
    items = discover(str(listing))
    assert rels(items) == ["clips/clip-0.mp4", "clips/clip-1.mp4", "photos/photo-1.jpg", "photos/photo-0.jpg"]
    assert [item.kind for item in items] == ["video", "video", "image", "image"]


def test_what_is_a_collection(tmp_path):
    root = make_collection(tmp_path / "in", clips=1, photos=0)
    (tmp_path / "list.txt").write_text("in\n")
    assert is_collection(str(root)) and is_collection(str(root / "*.mp4")) and is_collection(str(tmp_path / "list.txt"))
    for single in ("0", "rtsp://127.0.0.1/x", str(root / "clips" / "clip-0.mp4"), str(tmp_path / "no.txt"), None):
        assert not is_collection(single)


def test_outputs_mirror_the_inputs_and_never_share_a_name(tmp_path):
    write_clip(tmp_path / "in" / "a.avi", frames=2)
    write_clip(tmp_path / "in" / "a.mp4", frames=2)
    write_clip(tmp_path / "in" / "b.mkv", frames=2)
    from synthetic import write_photo

    write_photo(tmp_path / "in" / "p.ppm")
    write_photo(tmp_path / "in" / "q.webp")
    names = {item.rel: item.output_rel for item in discover(str(tmp_path / "in"))}
    assert names == {"a.avi": "a.avi.mp4", "a.mp4": "a.mp4", "b.mkv": "b.mp4", "p.ppm": "p.png", "q.webp": "q.webp"}


def test_nothing_to_explain_and_a_file_as_output_are_one_line_errors(tmp_path, capsys, tiny_onnx):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(SourceError, match="no video or image"):
        discover(str(tmp_path / "empty"))
    root = make_collection(tmp_path / "in", clips=1, photos=0)
    for output in (tmp_path / "out.mp4", root / "notes.txt"):
        assert main(["run", "--model", str(tiny_onnx), "--source", str(root), "--output", str(output),
                     "--no-display", "--no-ray"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("realtime-cam: error: --output must be a folder") and "Traceback" not in "".join(err)
    assert main(["run", "--model", str(tiny_onnx), "--source", str(tmp_path / "empty"), "--output",
                 str(tmp_path / "o"), "--no-display", "--no-ray"]) == 2
    assert "no video or image to explain" in capsys.readouterr().err


# ----------------------------------------------------------------------------- run, in this process
def run_collection(model, source, out, *extra) -> int:
    return main(["run", "--model", str(model), "--source", str(source), "--output", str(out), "--no-display",
                 "--topk", "2", "--box", *extra])


def test_a_collection_equals_each_file_run_alone_and_writes_its_results(tiny_onnx, tmp_path, capsys):
    root = make_collection(tmp_path / "in", clips=2, photos=2, frames=10)
    out = tmp_path / "out"
    assert run_collection(tiny_onnx, root, out, "--no-ray") == 0
    err = capsys.readouterr().err
    assert "4 file(s) explained (22 frames), 0 skipped as complete, 0 failed; in-process" in err
    for item in discover(str(root)):
        alone = tmp_path / "alone" / item.output_rel
        alone.parent.mkdir(parents=True, exist_ok=True)
        assert main(["run", "--model", str(tiny_onnx), "--source", item.path, "--output", str(alone),
                     "--no-display", "--topk", "2", "--box"]) == 0
        mine, theirs = decoded(out / item.output_rel), decoded(alone)
        assert len(mine) == len(theirs) == (10 if item.kind == "video" else 1)
        assert all((a == b).all() for a, b in zip(mine, theirs))
    rows = read_table(out / "results.parquet")
    assert len(rows) == 22
    clip = [r for r in rows if r["file"] == "clips/clip-1.mp4"]
    assert [r["frame"] for r in clip] == list(range(10))
    assert clip[3]["time_s"] == pytest.approx(0.3)
    for r in rows:
        assert len(r["topk_ids"]) == len(r["topk_labels"]) == len(r["topk_probs"]) == 2
        assert r["method"] == "cam" and None not in (r["box_x0"], r["box_y1"], r["peak_x"], r["peak_y"])
        w, h = (160, 120) if r["file"].startswith("clips") else (200, 150)
        assert 0 <= r["peak_x"] < w and 0 <= r["peak_y"] < h and r["box_x1"] <= w
    summary = {s["file"]: s for s in read_table(out / "summary.parquet")}
    assert summary["clips/clip-0.mp4"]["frames"] == 10 and summary["photos/photo-1.jpg"]["frames"] == 1
    assert all(s["status"] == "ok" and s["dominant_label"] for s in summary.values())
    assert summary["clips/clip-0.mp4"]["mean_flicker"] > 0 and summary["photos/photo-0.jpg"]["mean_flicker"] is None
    assert not partials(out)


def test_an_unreadable_file_is_listed_with_its_reason_and_the_others_complete(tiny_onnx, tmp_path, capsys):
    root = make_collection(tmp_path / "in", clips=1, photos=1, frames=4)
    (root / "clips" / "broken.mp4").write_bytes(b"not a video at all" * 100)
    out = tmp_path / "out"
    assert run_collection(tiny_onnx, root, out, "--no-ray") == 2
    err = capsys.readouterr().err
    assert "1 of 3 file(s) failed" in err and "Traceback" not in err
    summary = {s["file"]: s for s in read_table(out / "summary.parquet")}
    assert summary["clips/broken.mp4"]["status"] == "error" and "broken.mp4" in summary["clips/broken.mp4"]["reason"]
    assert summary["clips/clip-0.mp4"]["status"] == summary["photos/photo-0.jpg"]["status"] == "ok"
    assert (out / "clips" / "clip-0.mp4").is_file() and not (out / "clips" / "broken.mp4").exists()
    assert not partials(out)


def test_a_second_run_does_only_the_missing_files_and_overwrite_redoes_them_all(tiny_onnx, tmp_path, capsys):
    root = make_collection(tmp_path / "in", clips=2, photos=1, frames=4)
    out = tmp_path / "out"
    assert run_collection(tiny_onnx, root, out, "--no-ray") == 0
    (out / "clips" / "clip-1.mp4").unlink()  # as if the run had been interrupted in this file
    capsys.readouterr()
    assert run_collection(tiny_onnx, root, out, "--no-ray") == 0
    assert "1 file(s) explained (4 frames), 2 skipped as complete" in capsys.readouterr().err
    statuses = {s["file"]: s["status"] for s in read_table(out / "summary.parquet")}
    assert statuses == {"clips/clip-0.mp4": "skipped-complete", "clips/clip-1.mp4": "ok",
                        "photos/photo-0.jpg": "skipped-complete"}
    assert len(read_table(out / "results.parquet")) == 9  # the skipped files' rows are kept
    assert run_collection(tiny_onnx, root, out, "--no-ray", "--overwrite") == 0
    assert "3 file(s) explained (9 frames), 0 skipped" in capsys.readouterr().err


def test_a_file_done_with_other_options_or_another_model_is_done_again(tiny_onnx, tmp_path, capsys):
    import os
    import shutil

    root = make_collection(tmp_path / "in", clips=1, photos=1, frames=4)
    out = tmp_path / "out"
    model = shutil.copy(tiny_onnx, tmp_path / "model.onnx")
    assert run_collection(model, root, out, "--no-ray") == 0
    first = (out / "clips" / "clip-0.mp4").read_bytes()
    capsys.readouterr()
    assert run_collection(model, root, out, "--no-ray", "--alpha", "0.2") == 0
    err = capsys.readouterr().err
    assert "2 file(s) in" in err and "made before with other options (alpha): done again" in err
    assert "2 file(s) explained (5 frames), 0 skipped" in err
    assert (out / "clips" / "clip-0.mp4").read_bytes() != first  # the overlay is the new alpha's
    assert run_collection(model, root, out, "--no-ray", "--alpha", "0.2") == 0  # the same options: nothing to do
    assert "0 file(s) explained (0 frames), 2 skipped as complete" in capsys.readouterr().err
    stat = os.stat(model)
    os.utime(model, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the model exported again to its path
    assert run_collection(model, root, out, "--no-ray", "--alpha", "0.2") == 0
    err = capsys.readouterr().err
    assert "(model): done again" in err and "2 file(s) explained" in err


def test_without_ray_the_command_runs_in_process_and_says_how_to_install_it(tiny_onnx, tmp_path, capsys,
                                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if it were not installed
    root = make_collection(tmp_path / "in", clips=1, photos=1, frames=3)
    assert run_collection(tiny_onnx, root, tmp_path / "out") == 0
    err = capsys.readouterr().err
    assert "pip install 'realtime-cam[ray]'" in err and "in-process" in err
    assert main(["run", "--model", str(tiny_onnx), "--source", str(root), "--output", str(tmp_path / "o2"),
                 "--no-display", "--ray-address", "127.0.0.1:6379"]) == 2
    assert "--ray-address needs Ray" in capsys.readouterr().err


def test_without_pyarrow_the_tables_are_csv(tiny_onnx, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    root = make_collection(tmp_path / "in", clips=1, photos=1, frames=3)
    out = tmp_path / "out"
    assert run_collection(tiny_onnx, root, out, "--no-ray") == 0
    rows = read_table(out / "results.csv")
    assert len(rows) == 4 and len(rows[0]["topk_ids"].split(";")) == 2
    assert {s["status"] for s in read_table(out / "summary.csv")} == {"ok"}


def test_an_output_folder_inside_the_input_is_never_read_as_input(tiny_onnx, tmp_path, capsys):
    root = make_collection(tmp_path / "in", clips=1, photos=1, frames=3)
    assert run_collection(tiny_onnx, root, root / "out", "--no-ray") == 0
    assert run_collection(tiny_onnx, root, root / "out", "--no-ray") == 0
    assert "2 skipped as complete" in capsys.readouterr().err
    assert not (root / "out" / "out").exists()
    assert run_collection(tiny_onnx, root, root, "--no-ray") == 2
    assert "is the collection's own folder" in capsys.readouterr().err


def test_help_lists_the_collection_options():
    from realtime_cam.cli import build_parser

    text = build_parser().commands["run"].format_help()
    for option in ("--workers", "--gpus-per-worker", "--ray-address", "--no-ray", "--overwrite"):
        assert option in text


def test_after_ctrl_c_mid_file_a_second_run_does_only_the_files_not_complete(tiny_onnx, tmp_path, capsys,
                                                                               monkeypatch):
    from realtime_cam.collection.command import CollectionProgress

    root = make_collection(tmp_path / "in", clips=3, photos=0, frames=8)
    out = tmp_path / "out"
    add_frames = CollectionProgress.add_frames

    def interrupt_in_the_second_file(self, n):
        add_frames(self, n)
        if self.frames == 12:
            raise KeyboardInterrupt

    monkeypatch.setattr(CollectionProgress, "add_frames", interrupt_in_the_second_file)
    assert run_collection(tiny_onnx, root, out, "--no-ray") == 130
    assert "clips/clip-1.mp4: interrupted after" in capsys.readouterr().err
    assert not partials(out) and not (out / "clip-2.mp4").exists()
    monkeypatch.setattr(CollectionProgress, "add_frames", add_frames)
    assert run_collection(tiny_onnx, root, out, "--no-ray") == 0
    assert "2 file(s) explained (16 frames), 1 skipped as complete" in capsys.readouterr().err
    assert all(len(decoded(out / "clips" / f"clip-{i}.mp4")) == 8 for i in range(3))


def test_a_ray_address_where_nothing_answers_is_a_one_line_error(tiny_onnx, tmp_path, capsys):
    pytest.importorskip("ray.data")
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = make_collection(tmp_path / "in", clips=1, photos=0, frames=2)
    assert run_collection(tiny_onnx, root, tmp_path / "out", "--ray-address", f"127.0.0.1:{port}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"realtime-cam: error: --ray-address 127.0.0.1:{port}: nothing answers there")


def test_joining_a_cluster_warns_when_the_output_folder_is_not_shared_storage(tmp_path, monkeypatch, caplog):
    from realtime_cam.collection import on_ray

    for fs, address, warned in (("ext4", "10.0.0.5:6379", True), ("nfs4", "10.0.0.5:6379", False),
                                ("ext4", "127.0.0.1:6379", False), ("ext4", None, False)):
        monkeypatch.setattr(on_ray, "_filesystem_type", lambda path, fs=fs: fs)
        caplog.clear()
        on_ray.warn_if_not_shared(address, tmp_path)
        assert ("must be shared storage" in caplog.text) == warned, (fs, address)


def test_plan_of_workers_shares_the_cpus_and_never_exceeds_a_node():
    from realtime_cam.collection.on_ray import worker_plan

    assert worker_plan(2, None, 10) == (2, 1.0, 1)      # default: one worker per CPU, one thread each
    assert worker_plan(2, 1, 10) == (1, 2.0, 2)         # a lone worker has the CPUs and their threads
    assert worker_plan(2, 4, 10) == (4, 0.5, 1)         # more workers than CPUs: a fraction each
    assert worker_plan(2, 8, 3) == (3, 0.25, 1)         # never more workers than files
    assert worker_plan(2, 1, 10, node_cpus=1) == (1, 1.0, 1)  # two one-CPU nodes: one node's worth
    assert worker_plan(2, 1, 10, cpus_each=1.0) == (1, 1.0, 1)  # bench's one worker of one CPU


def test_many_files_are_queued_at_each_worker_and_the_largest_go_first(tmp_path):
    from realtime_cam.collection.discover import Item
    from realtime_cam.collection.on_ray import largest_first, tasks_in_flight

    assert tasks_in_flight(files=3, actors=2) == 1    # a few (long) files: each to the first free worker
    assert tasks_in_flight(files=8, actors=2) == 2    # many: the next one waits at the worker, no idle gap
    sizes = {"a.mp4": 10, "b.mp4": 3000, "c.jpg": 200}
    items = []
    for name, size in sizes.items():
        (tmp_path / name).write_bytes(b"x" * size)
        items.append(Item(str(tmp_path / name), name, "video", name))
    items.append(Item(str(tmp_path / "gone.mp4"), "gone.mp4", "video", "gone.mp4"))  # unreadable: last, kept
    assert [i.rel for i in largest_first(items)] == ["b.mp4", "c.jpg", "a.mp4", "gone.mp4"]
