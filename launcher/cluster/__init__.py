"""coldstart past one machine, on Ray: ``RayHost`` (``ray_host.py``) places each replica as a Ray actor
(``actor.py``) on a node with a free unit (``node.py``: what a node declares). Nothing here is imported
without ``--cluster``: ``server.py`` imports ``ray_host`` lazily, and only this package imports ``ray``."""
