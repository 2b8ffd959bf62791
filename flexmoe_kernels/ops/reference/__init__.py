"""The "torch" backend and executable spec: one module per pipeline stage.

=============  ===================================================================
stage          module
=============  ===================================================================
routing        :mod:`.routing` (``route``, ``route_hidden``, ``router_z_loss``)
permutation    :mod:`.permute` (``permute_rows``)
experts        :mod:`.experts` (``experts_per_expert``, ``grouped_swiglu``)
combine        :mod:`.combine` (``combine_rows``)
backend entry  :mod:`.backend` (``is_available``, ``forward``)
=============  ===================================================================
"""
