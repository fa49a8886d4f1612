"""From phone bundles to MLC-LLM's Android app: the build's tools and sources
(``toolchain``, ``sources``, ``pins``), the model libraries (``model_libs``), the build
(``package``) and the phone (``push``)."""
