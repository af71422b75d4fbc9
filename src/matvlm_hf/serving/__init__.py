"""Serving a MaTVLM checkpoint to people: the chat engine (`chat`, no web framework) and the Gradio page
(`gradio_app`, needs the `[demo]` extra; imported only by `matvlm serve`)."""
