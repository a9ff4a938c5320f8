"""Packaging: jar analysis, runtime trimming, image writers."""
