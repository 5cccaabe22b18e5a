"""Searchers that fit continuous parameters and try structural alternatives (written by another task;
this stub only lets actdiff.compare.search import it)."""
