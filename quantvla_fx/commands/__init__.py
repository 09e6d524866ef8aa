"""The subcommands of ``quantvla-fx``: one module each, plus what they share."""
