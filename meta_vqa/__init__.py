"""meta_vqa: language-guided generation of task-specific network weights."""

__version__ = "0.1.0"
