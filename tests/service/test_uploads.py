"""Container sniffing: by the first bytes, never the file name."""

import os
import struct
import time

import pytest

from service.uploads import safe_filename, sniff_container, sweep_incoming
from tests.service.helpers import fake_mp4, m4a_header, wav_header


def ts_packets(stride: int = 188, offset: int = 0, count: int = 4) -> bytes:
    packet = bytes(offset) + b"\x47" + bytes(stride - offset - 1)
    return packet * count


@pytest.mark.parametrize(
    ("head", "container"),
    [
        (fake_mp4(), "mp4"),
        (m4a_header(), "mp4"),  # audio-only MPEG-4: the worker finds no video stream
        (struct.pack(">I", 20) + b"ftypqt  " + bytes(100), "mov"),
        (struct.pack(">I", 8) + b"wide" + bytes(100), "mov"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska" + bytes(50), "mkv"),
        (b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm" + bytes(50), "webm"),
        (b"RIFF\x00\x00\x00\x00AVI LIST" + bytes(50), "avi"),
        (b"FLV\x01\x05" + bytes(50), "flv"),
        (b"OggS\x00\x02" + bytes(50), "ogg"),
        (bytes.fromhex("3026b2758e66cf11a6d900aa0062ce6c") + bytes(50), "asf"),
        (b"\x00\x00\x01\xba" + bytes(50), "mpeg"),
        (ts_packets(), "mpegts"),
        (ts_packets(192, 4), "m2ts"),
        (b"\x06\x0e\x2b\x34" + bytes(50), "mxf"),
    ],
)
def test_containers_are_recognized(head, container):
    assert sniff_container(head) == container


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"hello world, this is text" * 10,
        wav_header(),
        b"ID3\x04\x00" + bytes(100),  # MP3
        b"fLaC" + bytes(100),
        b"\x89PNG\r\n\x1a\n" + bytes(100),
        b"%PDF-1.7" + bytes(100),
        b"\x47" + bytes(400),  # one sync byte is just a "G"
        b"<html>" + bytes(100),
    ],
)
def test_other_files_are_not(head):
    assert sniff_container(head) is None


def test_filenames_are_metadata_only():
    assert safe_filename(b"../../etc/passwd") == "passwd"
    assert safe_filename(b"C:\\videos\\clip one.mp4") == "clip one.mp4"
    assert safe_filename(b"bad\x00\x1bname.mp4") == "badname.mp4"
    assert safe_filename(b"") == "upload" and len(safe_filename(b"x" * 1000)) == 255


def test_stale_partial_uploads_are_swept(tmp_path):
    old, fresh = tmp_path / "old.part", tmp_path / "fresh.part"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert sweep_incoming(tmp_path) == 1 and not old.exists() and fresh.exists()
    assert sweep_incoming(tmp_path / "missing") == 0
