"""The utilization study behind ``benchmarks/utilization_study.py``, in three parts.

``rows`` defines what each row trains (``peer`` adapts row 10's library), ``runner`` trains and
measures the runs and writes the JSON, ``report`` turns the JSON into the markdown and PNGs.
"""
