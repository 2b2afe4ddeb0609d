"""Video files through FFmpeg (PyAV): H.264 that a browser plays, the source's timestamps and audio, no pixel
lost, the real frame count, and the encoder said once (issue 16)."""

from __future__ import annotations

import logging
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from browser import needs_browser, served
from conftest import needs_shared, shared

from realtime_cam.cli import main
from realtime_cam.encoders import PyAvEncoder, VideoSettings


def scene(i: int, size_wh: tuple[int, int]) -> np.ndarray:
    w, h = size_wh
    img = np.full((h, w, 3), 60, np.uint8)
    cv2.circle(img, (int(w * (0.2 + 0.6 * (i % 20) / 20)), h // 2), max(2, h // 5), (30, 160, 230), -1)
    return img


def make_video(path, times_s, size_wh=(160, 120), audio_s: float | None = None, rate=25, codec="libx264",
               pix_fmt="yuv420p"):
    """A clip made with PyAV: frames at the given times (variable frame rate when they are uneven), and an
    AAC sine tone of ``audio_s`` seconds."""
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=rate)
        video.width, video.height = size_wh
        video.pix_fmt = pix_fmt
        video.codec_context.time_base = Fraction(1, 1000)
        audio = None
        if audio_s is not None:
            audio = out.add_stream("aac", rate=48000)
            audio.layout = "mono"
        for i, t in enumerate(times_s):
            frame = av.VideoFrame.from_ndarray(scene(i, size_wh), format="bgr24")
            frame.pts, frame.time_base = round(t * 1000), Fraction(1, 1000)
            for packet in video.encode(frame):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if audio is not None:
            samples = np.sin(2 * np.pi * 440 * np.arange(int(48000 * audio_s)) / 48000).astype(np.float32)
            for start in range(0, len(samples), 1024):
                chunk = av.AudioFrame.from_ndarray(samples[None, start:start + 1024], format="flt", layout="mono")
                chunk.sample_rate, chunk.pts = 48000, start
                for packet in audio.encode(chunk):
                    out.mux(packet)
            for packet in audio.encode(None):
                out.mux(packet)
    return path


def frame_times(path) -> list[float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [float(f.time) for f in container.decode(stream)]


def run(model, source, output, *extra):
    return main(["run", "--model", str(model), "--source", str(source), "--output", str(output), "--no-display",
                 *extra])


def test_an_mp4_is_h264_yuv420p_with_its_index_first(tiny_onnx, tmp_path):
    source = make_video(tmp_path / "in.mkv", [i / 25 for i in range(30)])
    out = tmp_path / "o.mp4"
    assert run(tiny_onnx, source, out) == 0
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        assert video.codec_context.name == "h264" and video.codec_context.pix_fmt == "yuv420p"
        assert video.frames == 30
    data = out.read_bytes()
    assert 0 <= data.find(b"moov") < data.find(b"mdat")  # +faststart: a browser plays it while it loads


@needs_browser
def test_the_mp4_plays_in_a_real_browser(tiny_onnx, tmp_path, chromium):
    """Today's default (OpenCV's MPEG-4 Part 2) did not play in Chrome; the H.264 .mp4 must, with its length."""
    source = make_video(tmp_path / "in.mkv", [i / 25 for i in range(50)])
    out = tmp_path / "o.mp4"
    assert run(tiny_onnx, source, out) == 0
    page = chromium.new_page()
    try:
        with served(tmp_path) as base:
            page.set_content(f'<video id="v" src="{base}/o.mp4" muted preload="auto"></video>')
            page.wait_for_function("(v => v.readyState >= 2 || v.error)(document.getElementById('v'))",
                                   timeout=30_000)
            state = page.evaluate("(v => ({ready: v.readyState, duration: v.duration, error: v.error && "
                                  "v.error.code, width: v.videoWidth}))(document.getElementById('v'))")
    finally:
        page.close()
    assert state["error"] is None and state["ready"] >= 2, state
    assert state["duration"] == pytest.approx(2.0, abs=0.05) and state["width"] == 160


@pytest.mark.parametrize("suffix", [".mkv", ".mp4", ".webm"])
def test_variable_frame_rate_keeps_its_timestamps(tiny_onnx, tmp_path, suffix):
    """A clip whose frames come at uneven times (a phone's, a screen recording's): each overlay frame is shown
    at its source frame's time (it used to come out 1/fps apart: a 33.3 s MKV lasted 10.1 s)."""
    times = [0.0, 0.04, 0.08, 0.5, 0.54, 1.3, 1.34, 1.38, 2.9, 3.0]
    source = make_video(tmp_path / "vfr.mkv", times)
    out = tmp_path / f"o{suffix}"
    assert run(tiny_onnx, source, out) == 0
    got = frame_times(out)
    assert got == pytest.approx([t - times[0] + got[0] for t in times], abs=0.002)


def test_an_avi_that_dropped_frames_keeps_its_gaps(tiny_onnx, tmp_path):
    """AVI has no presentation times: a capture that dropped frames holds empty chunks in their place. Its
    frames used to be timed by their index, the gaps closed up (0.2 s came out at 0.12 s)."""
    times = [0.0, 0.04, 0.08, 0.2, 0.24, 0.28, 0.6, 0.64]
    source = make_video(tmp_path / "gaps.avi", times, codec="mjpeg", pix_fmt="yuvj420p")
    out = tmp_path / "o.mkv"
    assert run(tiny_onnx, source, out) == 0
    got = frame_times(out)
    assert got == pytest.approx([t - times[0] + got[0] for t in times], abs=0.002)


def test_the_sources_audio_is_copied_where_the_container_holds_it(tiny_onnx, tmp_path, caplog):
    source = make_video(tmp_path / "talk.mp4", [i / 25 for i in range(50)], audio_s=2.0)
    out = tmp_path / "o.mp4"
    with caplog.at_level(logging.INFO, logger="realtime_cam"):
        assert run(tiny_onnx, source, out) == 0
    with av.open(str(out)) as container:
        [audio] = container.streams.audio
        assert audio.codec_context.name == "aac"
        packets = [p for p in container.demux(audio) if p.size]
        end = float((packets[-1].pts + packets[-1].duration) * audio.time_base)
    assert end == pytest.approx(2.0, abs=0.05)  # all of it, not re-encoded (AAC stays AAC)
    assert "the source's aac audio copied" in caplog.text
    # WebM holds Opus or Vorbis only: the video is written, and the user is told the audio is not.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="realtime_cam"):
        assert run(tiny_onnx, source, tmp_path / "o.webm") == 0
    with av.open(str(tmp_path / "o.webm")) as container:
        assert not container.streams.audio and container.streams.video[0].frames in (0, 50)
    assert "audio (aac) is not copied" in caplog.text


def test_audio_stops_with_the_last_frame_written(tiny_onnx, tmp_path):
    source = make_video(tmp_path / "talk.mp4", [i / 25 for i in range(50)], audio_s=2.0)
    out = tmp_path / "o.mkv"
    assert run(tiny_onnx, source, out, "--max-frames", "25") == 0
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        last = max(float(p.pts * audio.time_base) for p in container.demux(audio) if p.size)
    assert 0.9 <= last <= 1.05


def test_at_the_end_of_the_source_its_audio_is_copied_to_its_own_end(tiny_onnx, tmp_path):
    """A clip whose sound goes on after its last frame (2.6 s of audio, 2 s of video): the whole sound is kept,
    as in the source (it used to stop one frame after the last; --max-frames still cuts it, test above)."""
    source = make_video(tmp_path / "talk.mp4", [i / 25 for i in range(50)], audio_s=2.6)
    out = tmp_path / "o.mkv"
    assert run(tiny_onnx, source, out) == 0
    with av.open(str(out)) as container:
        audio = container.streams.audio[0]
        packets = [p for p in container.demux(audio) if p.size]
        end = float((packets[-1].pts + packets[-1].duration) * audio.time_base)
    assert end == pytest.approx(2.6, abs=0.05)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".avi"])
def test_odd_sizes_are_padded_never_cropped(tiny_onnx, tmp_path, suffix, caplog):
    # 641x361: an odd size, as some phones and screen recorders give (lossless FFV1 holds it as it is)
    odd = make_video(tmp_path / "odd.mkv", [i / 25 for i in range(5)], (641, 361), codec="ffv1", pix_fmt="yuv444p")
    out = tmp_path / f"o{suffix}"
    with caplog.at_level(logging.INFO, logger="realtime_cam"):
        assert run(tiny_onnx, odd, out, "--alpha", "0") == 0
    with av.open(str(out)) as container:
        frame = next(container.decode(video=0))
        image = frame.to_ndarray(format="bgr24")
    assert image.shape[:2] == (362, 642)  # 4:2:0 needs even sides: one black row and column are added
    assert caplog.text.count("641x361 padded to 642x362") == 1
    assert image[361].max() < 40 and image[:, 641].max() < 40
    assert image[:361, :641].mean() > 40 and image[360, :640].mean() > 40  # the picture, all of it


@needs_shared
def test_the_progress_counts_the_frames_the_file_holds(tiny_onnx, tmp_path, capsys):
    """vtest.avi's header states 682 frames; it holds 341."""
    assert run(tiny_onnx, shared("videos", "vtest.avi"), tmp_path / "o.mp4", "--max-frames", "40") == 0
    err = capsys.readouterr().err
    assert "/341 " in err and "682" not in err, err


def test_an_unknown_codec_or_a_quality_it_lacks_is_one_line(tiny_onnx, tmp_path, capsys):
    source = make_video(tmp_path / "in.mkv", [i / 25 for i in range(3)])
    assert run(tiny_onnx, source, tmp_path / "o.mp4", "--codec", "h263000") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("realtime-cam: error: --codec h263000: not a video encoder") and "libx264" in line
    assert run(tiny_onnx, source, tmp_path / "o.avi", "--crf", "20") == 2
    assert "mjpeg has no constant-quality setting" in capsys.readouterr().err
    assert not list(tmp_path.glob("o.*")) and not list(tmp_path.glob(".o.*"))


def test_codec_and_crf_are_used(tiny_onnx, tmp_path):
    source = make_video(tmp_path / "in.mkv", [i / 25 for i in range(10)])
    assert run(tiny_onnx, source, tmp_path / "best.mkv", "--crf", "0") == 0
    assert run(tiny_onnx, source, tmp_path / "small.mkv", "--crf", "45") == 0
    assert (tmp_path / "best.mkv").stat().st_size > 3 * (tmp_path / "small.mkv").stat().st_size
    assert run(tiny_onnx, source, tmp_path / "o.mkv", "--codec", "mpeg4") == 0
    with av.open(str(tmp_path / "o.mkv")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4"


def test_the_gpu_encoder_is_used_only_when_it_opens(tmp_path, caplog):
    """--device cuda asks for NVENC; where it does not open (no NVIDIA GPU here) the CPU's encoder runs, and
    the user is told once why."""
    with caplog.at_level(logging.INFO, logger="realtime_cam"):
        encoder = PyAvEncoder(tmp_path / "o.mp4", ".mp4", 25, (64, 48), VideoSettings(hardware=True))
    encoder.write(np.zeros((48, 64, 3), np.uint8), 0.0)
    encoder.close()
    if encoder.codec == "h264_nvenc":
        pytest.skip("NVENC opened: this machine has an NVIDIA GPU")
    assert encoder.codec == "libx264"
    assert caplog.text.count("h264_nvenc did not open") == 1 and "encoding on the CPU" in caplog.text


def test_a_file_that_is_no_video_is_one_line(tiny_onnx, tmp_path, capsys):
    bogus = tmp_path / "notes.mp4"
    bogus.write_text("these are not frames\n" * 50)
    assert run(tiny_onnx, bogus, tmp_path / "o.mp4") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(f"realtime-cam: error: cannot open {bogus} as a video (")


def test_the_first_failed_write_stops_the_file(tmp_path):
    """FFmpeg reports a failed write (a full disk): nothing more is encoded, the next frame handed over raises
    the error with where the frames written so far are, and the output never takes its name."""
    from realtime_cam.errors import SinkError
    from realtime_cam.sinks import VideoFileSink

    sink = VideoFileSink(tmp_path / "o.mp4", 25, (64, 48))
    real, calls = sink._writer.write, []

    def fails_third(image, time_s):
        calls.append(time_s)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(image, time_s)

    sink._writer.write = fails_third
    with pytest.raises(SinkError) as caught:
        for _ in range(50):
            sink.write(np.zeros((48, 64, 3), np.uint8))
    assert len(calls) == 3  # the encoder thread wrote nothing after the failure
    assert str(caught.value) == (f"writing {tmp_path / 'o.mp4'} failed: [Errno 28] No space left on device; what "
                                 f"was written is left in {sink.temporary_path}")
    sink.close()  # closing again adds nothing
    assert not (tmp_path / "o.mp4").exists() and sink.temporary_path.exists()


def test_a_gpu_encoder_that_opens_is_the_one_used(tmp_path, monkeypatch):
    """The other branch of the test above, where no GPU is lent: an encoder that opens (mpeg4 stands in for
    NVENC) replaces libx264, and the file is written with it."""
    monkeypatch.setitem(PyAvEncoder.__init__.__globals__["HARDWARE_ENCODERS"], "libx264", "mpeg4")
    encoder = PyAvEncoder(tmp_path / "o.mp4", ".mp4", 25, (64, 48), VideoSettings(hardware=True))
    for i in range(3):
        encoder.write(np.zeros((48, 64, 3), np.uint8), i / 25)
    encoder.close()
    assert encoder.codec == "mpeg4"
    with av.open(str(tmp_path / "o.mp4")) as container:
        assert container.streams.video[0].codec_context.name == "mpeg4" and container.streams.video[0].frames == 3


def _rotated(path, degrees_matrix):
    """An MP4 with a display matrix in its track header, as a phone writes a portrait video: a red block at the
    top-left of the coded frame."""
    import struct

    image = np.zeros((48, 64, 3), np.uint8)
    image[:10, :20] = (0, 0, 255)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(image, format="bgr24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    version = data[at + 4]
    offset = at + 8 + (32 if version == 1 else 20) + 16  # past the times, track id, duration, layer, volume
    struct.pack_into(">9i", data, offset, *degrees_matrix)
    path.write_bytes(bytes(data))
    return path


def test_a_portrait_phone_video_is_explained_upright(tmp_path):
    """A 90-degree display matrix (a phone held upright): frames come upright, as players and OpenCV's capture
    show them, not sideways."""
    from realtime_cam.sources import open_source

    clip = _rotated(tmp_path / "portrait.mp4", [0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000])
    opencv = cv2.VideoCapture(str(clip)).read()[1]
    with open_source(str(clip)) as src:
        frames = list(src)
    assert src.size_wh == (48, 64) and frames[0].image_bgr.shape == (64, 48, 3) == opencv.shape
    assert np.abs(frames[0].image_bgr.astype(int) - opencv).mean() < 2


def test_audio_whose_timestamps_go_back_does_not_cost_the_video(tiny_onnx, tmp_path):
    """Two recordings joined byte for byte (cat a.ts b.ts): the audio's timestamps start again halfway. The
    packets that go back are dropped; the video keeps every frame."""
    part = make_video(tmp_path / "part.ts", [i / 25 for i in range(25)], audio_s=1.0)
    joined = tmp_path / "joined.ts"
    joined.write_bytes(part.read_bytes() * 2)
    out = tmp_path / "o.mp4"
    assert run(tiny_onnx, joined, out) == 0
    with av.open(str(out)) as container:
        assert container.streams.video[0].frames == 50 and container.streams.audio


def test_a_first_write_that_fails_says_nothing_was_left(tmp_path):
    from realtime_cam.errors import SinkError
    from realtime_cam.sinks import VideoFileSink

    sink = VideoFileSink(tmp_path / "o.mp4", 25, (64, 48))

    def full(image, time_s):
        raise OSError(28, "No space left on device")

    sink._writer.write = full
    with pytest.raises(SinkError) as caught:
        for _ in range(20):
            sink.write(np.zeros((48, 64, 3), np.uint8))
    assert str(caught.value) == f"writing {tmp_path / 'o.mp4'} failed: [Errno 28] No space left on device"
    assert not list(tmp_path.iterdir())
