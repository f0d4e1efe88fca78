"""Course tooling for learners: the ``moe-course`` command (also ``python -m moe_course``).

    layout         where things are: lessons, exercises, the cell that holds each answer (reads JSON, no torch)
    results        from nbval's cell outcomes to one result per exercise; the last results, kept in .moe-course/
    pytest_plugin  nbval on exercise notebooks: check cells named by their exercise, short plain failures
    checking       `moe-course check`: run the notebooks, one line per exercise, the full log in a file
    progress       `moe-course progress`: the whole course at a glance, without running anything
    backups        `moe-course reset` / `restore`: back to the stub, and back again, never losing work
    update         `moe-course update`: take a new version of the course with git, keeping your work
    cli            the command line

Nothing here imports torch or the model code: ``progress`` answers in a fraction of a second.
"""
