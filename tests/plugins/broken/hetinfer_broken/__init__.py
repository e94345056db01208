"""A hetinfer plugin that fails to import: hetinfer must report it once and go on."""

raise RuntimeError("hetinfer-broken fails to import on purpose")
