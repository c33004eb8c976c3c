"""`avpgan serve MODEL`: try a voice in a browser.

A local page where a user uploads recordings, or records one, and sees the face each voice
gives (and the restored face, when the bundle restores), with how much voice went into it.

- The voice -> face path is avpgan/generate.py's: `prepare` (decode, silence removal, S-second
  windows) and `faces_of` (the mean embedding of the windows, the EMA generator, the restorer),
  so a face on the page is the face `avpgan generate` writes for the same file.
- The bundle loads once, when the server starts: loading costs seconds, a request milliseconds.
  Requests run the networks one at a time (a lock): two at once would only split the cores.
- Recording happens in the browser (serve.html): MediaRecorder records in whatever format that
  browser records (webm/opus in Chromium, ogg/opus in Firefox, mp4 in Safari), the browser
  decodes its own recording and uploads 16-bit WAV. libsndfile, the project's decoder, reads
  WAV exactly but not webm, and WAV keeps the server free of a media framework.
- Uploads go as they are. What cannot be used (not audio, too little voice, too large, too many
  files) is said on the page, per file where it concerns one file; a bug still gets a traceback,
  on the server's console.
"""

from __future__ import annotations

import base64
import io
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

import jinja2
import numpy as np
import torch
from PIL import Image
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Route

from avpgan.audio import AudioError
from avpgan.generate import Voice, VoiceToFace, faces_of, open_model, prepare
from avpgan.images import to_uint8

MAX_UPLOAD_MB = 50  # a minute of 48 kHz WAV is 6 MB: plenty for voices, little for a mistake
MAX_FILES = 32  # one page of faces


def say(line: str) -> None:
    """The server's console: a line per request, seen at once even when piped."""
    print(line, flush=True)


@dataclass
class Face:
    kind: str  # generated | restored
    size: int  # pixels, the network's output (the page scales it up)
    uri: str  # data:image/png;base64,...


@dataclass
class Card:
    """One uploaded file on the page: its faces, or why it has none."""

    name: str
    faces: list[Face] = field(default_factory=list)
    clip: str = ""  # how much voice made the face: a face of 1 s of voice carries less evidence than one of 20 s
    problem: str = ""


def png_uri(image: np.ndarray) -> str:
    """A uint8 HxWx3 image inline in the page: nothing to store or clean up between requests."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def clip_text(voice: Voice, seconds: float) -> str:
    """The clip length and how the voice filled it (generate.py's rules)."""
    got, n = voice.voiced_seconds, len(voice.clips)
    if got < seconds:
        return f"{got:.1f} s of voice, repeated to one {seconds:g} s clip"
    if n > 1:
        return f"{got:.1f} s of voice: the mean of {n} clips of {seconds:g} s"
    return f"{got:.1f} s of voice: one {seconds:g} s clip"


class FaceMaker:
    """The bundle, loaded once, and what turns a request's files into cards."""

    def __init__(self, model: str | Path, seconds: float | None = None, restore: bool = True,
                 device: str | torch.device | None = None):
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = Path(model).name
        self.net = VoiceToFace(open_model(model, device), device)
        cfg = self.net.model.cfg
        self.seconds = float(seconds or cfg.data.crop_seconds)
        if self.seconds * self.net.sample_rate < self.net.logmel.win:
            raise ValueError(f"--seconds {self.seconds:g} is shorter than one {cfg.features.win_ms:g} ms "
                             f"analysis window")
        self.restore = restore and self.net.has_restorer
        self.lock = threading.Lock()

    def cards(self, files: list[tuple[str, Path]]) -> list[Card]:
        """(name shown, file on disk) -> one card per file, in order. The networks see every
        usable file in one batch, as `avpgan generate` does with a batch of files."""
        cards: list[Card] = []
        ready: list[tuple[Card, Voice]] = []
        top_db = self.net.model.cfg.data.vad_top_db
        for name, path in files:
            card = Card(name)
            cards.append(card)
            try:
                ready.append((card, prepare(path, self.net.sample_rate, self.seconds, top_db)))
            except AudioError as e:  # names the temporary file, where the user knows the upload's name
                card.problem = str(e).removeprefix(f"{path}: ").replace(str(path), name)
        if not ready:
            return cards
        with self.lock:
            face, restored, _ = faces_of(self.net, [v for _, v in ready], batch_size=64, restore=self.restore, seed=0)
        for i, (card, voice) in enumerate(ready):
            for kind, images in (("generated", face), ("restored", restored)):
                if images is not None:
                    card.faces.append(Face(kind, images.shape[-1], png_uri(to_uint8(images[i]))))
            card.clip = clip_text(voice, self.seconds)
        return cards


def _template() -> jinja2.Template:
    """serve.html, escaped by default: file names come from the user's disk and appear in the page."""
    text = resources.files("avpgan").joinpath("serve.html").read_text(encoding="utf-8")
    return jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined).from_string(text)


def create_app(model: str | Path, seconds: float | None = None, restore: bool = True,
               max_upload_mb: int = MAX_UPLOAD_MB, max_files: int = MAX_FILES,
               log: Callable[[str], None] = say) -> Starlette:
    """The page: GET / shows the form, POST / (the form's voices) shows it with their faces."""
    maker = FaceMaker(model, seconds, restore)
    template = _template()
    max_bytes = max_upload_mb * 1024 * 1024

    def page(status: int = 200, error: str = "", cards: list[Card] | None = None, took: float = 0.0) -> HTMLResponse:
        cards = cards or []
        html = template.render(model=maker.name, seconds=f"{maker.seconds:g}", restores=maker.restore,
                               max_files=max_files, max_upload_mb=max_upload_mb, error=error, cards=cards,
                               made=sum(1 for c in cards if c.faces), took=took)
        return HTMLResponse(html, status_code=status)

    async def show(request: Request) -> HTMLResponse:
        return page()

    async def make(request: Request) -> HTMLResponse:
        t0 = time.perf_counter()
        size = request.headers.get("content-length")
        if size is None or not size.isdigit():
            return page(411, "The upload did not say how large it is (no Content-Length); send it from the form.")
        if int(size) > max_bytes:
            # Read what was sent before answering: a browser still sending when the connection
            # closes shows a connection error instead of this page.
            async for _ in request.stream():
                pass
            return page(413, f"The upload is too large: {int(size) / 2**20:.1f} MB; this server takes up to "
                             f"{max_upload_mb} MB at once (avpgan serve --max-upload-mb).")
        try:
            form = await request.form(max_fields=10)  # the size check above bounds the number of files
        except HTTPException as e:  # a malformed body
            return page(400, f"The upload could not be read: {e.detail}")
        uploads = [f for f in form.getlist("voices") if isinstance(f, UploadFile) and (f.filename or f.size)]
        if not uploads:
            return page(400, "Choose one or more recordings first (or record one).")
        if len(uploads) > max_files:
            return page(400, f"Too many files: {len(uploads)}; this server takes up to {max_files} at once "
                             f"(avpgan serve --max-files).")
        with tempfile.TemporaryDirectory(prefix="avpgan-serve-") as tmp:
            files = []
            for i, upload in enumerate(uploads):
                name = Path(upload.filename or "recording").name
                path = Path(tmp) / f"{i}{Path(name).suffix.lower()}"  # a .wav is checked against its header
                path.write_bytes(await upload.read())
                files.append((name, path))
            cards = await run_in_threadpool(maker.cards, files)
        took = time.perf_counter() - t0
        log(f"{sum(1 for c in cards if c.faces)} of {len(cards)} files gave a face ({took:.2f} s)")
        return page(cards=cards, took=took)

    async def failed(request: Request, exc: Exception) -> HTMLResponse:
        """A bug, not the user's input: the page says so, the console has the traceback."""
        return page(500, f"The server failed on this request ({type(exc).__name__}); its console shows why.")

    return Starlette(routes=[Route("/", show, methods=["GET"]), Route("/", make, methods=["POST"])],
                     exception_handlers={Exception: failed})


def listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound here so that port 0 (any free port) can be printed as the real one."""
    try:
        return socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise OSError(e.errno, e.strerror, f"{host}:{port}") from None


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, seconds: float | None = None,
          restore: bool = True, max_upload_mb: int = MAX_UPLOAD_MB, max_files: int = MAX_FILES,
          log: Callable[[str], None] = say) -> None:
    """Load the bundle, then answer until Ctrl-C (or SIGTERM)."""
    import uvicorn

    app = create_app(model, seconds, restore, max_upload_mb, max_files, log)
    sock = listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    log(f"avpgan serve: {model} at http://{shown}:{bound}/  (Ctrl-C stops)")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
