"""The HTTP face of polymodal (`polymodal serve`): an OpenAI-compatible API (embeddings, chat about
an image), search over a collection, zero-shot classification, captions, and a web page.

    from polymodal.serve import ServeConfig, Services, create_app
    app = create_app(Services(ServeConfig(), collection=coll, vlm=vlm))

FastAPI and uvicorn are imported here, not by `import polymodal`.
"""

from polymodal.serve.app import create_app, run
from polymodal.serve.batching import Batcher, Overloaded
from polymodal.serve.services import ServeConfig, Services

__all__ = ["Batcher", "Overloaded", "ServeConfig", "Services", "create_app", "run"]
