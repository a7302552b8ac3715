"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, speaking the endpoints huggingface_hub's
`create_repo` and `upload_folder` call (read from huggingface_hub 2.5's hf_api.py and _commit_api.py):

    POST /api/repos/create                                   {name, organization, type, visibility}
    POST /api/{type}s/{org}/{name}/preupload/{revision}      which files go as LFS: here, none
    POST /api/{type}s/{org}/{name}/commit/{revision}         NDJSON: a header, then files in base64
    POST /api/validate-yaml                                  a README.md's metadata (before its commit)
    GET  /api/whoami-v2

It keeps the repos it was asked to create and the files committed to them, and refuses requests
without the expected bearer token (401), as the Hub does. For tests: point HF_ENDPOINT (or
huggingface_hub.constants.ENDPOINT) at `HubServer.url`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

USER = "tester"
_REPO_PATH = re.compile(r"^/api/(?P<type>models|datasets|spaces)/(?P<repo>[^/]+/[^/]+)/(?P<action>preupload|commit)/(?P<rev>[^/?]+)")


@dataclass
class HubRepo:
    repo_id: str
    repo_type: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class HubServer:
    def __init__(self, token: str = "hf_test_token") -> None:
        self.token = token
        self.repos: dict[str, HubRepo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.validated: list[str] = []  # README.md texts sent to /api/validate-yaml
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_POST(self) -> None:
                server._handle(self, "POST")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _reply(self, handler: BaseHTTPRequestHandler, method: str, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        with self._lock:
            self.requests.append((method, handler.path, status))
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        if handler.headers.get("Authorization") != f"Bearer {self.token}":
            return self._reply(handler, method, 401, {"error": "Invalid credentials in Authorization header"})
        path = handler.path.split("?", 1)[0]
        if method == "GET" and path == "/api/whoami-v2":
            return self._reply(handler, method, 200, {"type": "user", "name": USER, "orgs": []})
        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            repo_type = request.get("type") or "model"
            repo_id = f"{request.get('organization') or USER}/{request['name']}"
            with self._lock:
                exists = repo_id in self.repos
                if not exists:
                    self.repos[repo_id] = HubRepo(repo_id, repo_type, request.get("visibility") == "private")
            url = f"{self.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
            return self._reply(handler, method, 409 if exists else 200,
                               {"error": "You already created this repo", "url": url} if exists else {"url": url})
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_card(handler, json.loads(body)["content"])
        match = _REPO_PATH.match(path)
        repo = self.repos.get(match["repo"]) if match else None
        if match is None or repo is None:
            return self._reply(handler, method, 404, {"error": "Repository not found"})
        if match["action"] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(handler, method, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]})
        summary = ""
        for line in body.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                summary = item["value"].get("summary", "")
            elif item["key"] == "file":
                repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                return self._reply(handler, method, 400, {"error": f"unsupported commit operation {item['key']}"})
        oid = hashlib.sha1(json.dumps(sorted(repo.files)).encode() + summary.encode()).hexdigest()
        repo.commits.append(summary)
        return self._reply(handler, method, 200, {"commitUrl": f"{self.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid})

    def _validate_card(self, handler: BaseHTTPRequestHandler, content: str) -> None:
        """The card's YAML front matter must parse to a mapping (the Hub checks more: field types, known ids)."""
        import yaml

        with self._lock:
            self.validated.append(content)
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            meta = yaml.safe_load(match[1]) if match else {}
        except yaml.YAMLError as exc:
            meta = f"YAML error: {exc}"
        if not isinstance(meta, dict):
            return self._reply(handler, "POST", 400, {"errors": [{"message": f"metadata is not a mapping: {meta}"}]})
        return self._reply(handler, "POST", 200, {"warnings": []})
