"""The bundled configs: one file per paper setting, ``--config=NAME[:VARIANT]`` (``ltd-jax --list-configs``)."""
