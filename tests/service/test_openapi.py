"""openapi.yaml is generated from the app: this fails when the API changed but the file was not redone."""

import subprocess
import sys
from pathlib import Path

from service.openapi import DEFAULT_PATH, render

ROOT = Path(__file__).resolve().parents[2]


def test_openapi_yaml_is_up_to_date():
    assert DEFAULT_PATH == ROOT / "openapi.yaml"
    assert DEFAULT_PATH.read_text() == render(), "openapi.yaml drifted: run `python -m service.openapi`"


def test_every_route_documents_its_response_and_error_body():
    import yaml

    document = yaml.safe_load(render())
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("description"), f"{method} {path} has no docstring"
            assert any(code.startswith("2") for code in operation["responses"]), f"{method} {path}"
            body = "OpenAIErrorBody" if path.startswith("/v1/") else "ErrorBody"  # OpenAI's shape under /v1
            for code, response in operation["responses"].items():
                if code.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": f"#/components/schemas/{body}"
                    }, f"{method} {path} {code}"
            if path.startswith("/v1/"):
                assert "422" not in operation["responses"], f"{method} {path}: /v1 answers 400"


def test_check_mode_fails_on_drift(tmp_path):
    stale = tmp_path / "openapi.yaml"
    stale.write_text("openapi: 3.1.0\n")
    run = [sys.executable, "-m", "service.openapi", str(stale), "--check"]
    assert subprocess.run(run, cwd=ROOT, capture_output=True).returncode == 1
    assert subprocess.run(run[:-1], cwd=ROOT).returncode == 0  # regenerate
    assert subprocess.run(run, cwd=ROOT).returncode == 0
