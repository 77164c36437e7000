"""The bundled CPU demo: the generated corpus (corpus), the end-to-end run (run), random HF Llamas for tests (random_hf)."""
