"""What a run is asked to do: the Config fields and their choices, protocols by name, typed values, the settings that
cannot work together, and the sources that build a Config (YAML, flags, keyword settings, suite entries).

May import: errors.
"""
