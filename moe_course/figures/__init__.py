"""What the lessons draw: figures and the interactive widgets.

    plots      use_course_style() and the figures lessons 01-06 share (colour-blind-safe palette)
    lm_plots   loss curves, per-domain bars and routing heatmaps of the language models (lessons 07-08)
    beyond_plots  memory against experts, the exchanges between processes, imbalance, Soft MoE, adaptive compute (lesson 09)
    widgets    hospital_explorer(), mixture_playground(), waiting_room_playground(): ipywidgets

Import from the module (``from moe_course.figures.plots import grouped_bars``): this file
imports nothing, so that code without figures never loads matplotlib or ipywidgets.
"""
