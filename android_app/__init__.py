"""What ``mlc-edge package`` puts around MLC-LLM's Android app (see README.md)."""
