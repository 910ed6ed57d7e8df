"""Sweeps: models x conversions x variants x backends x devices x batch sizes, in this process or on Ray.

Sits beside ``serving`` under the CLI: it imports convert, runtimes, reports and core; nothing below imports it.
"""
