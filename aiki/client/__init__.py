"""What every Aiki client shares, whatever runs it: the sans-IO protocol core
(:mod:`aiki.client.core`) and the values it returns (:mod:`aiki.client.views`)."""
