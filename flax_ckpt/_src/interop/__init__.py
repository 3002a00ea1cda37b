"""Reading and writing other tools' checkpoint formats: Orbax directories
(``orbax_reading.py``), flax.serialization msgpack files (``msgpack_io.py``) and
safetensors files (``safetensors_io.py``). Sits beside the public API (it reads through
the engine and the storage layer); nothing here imports orbax.
"""
