"""The end-to-end demo (``flexmoe demo``) and opt-out inference (``flexmoe generate``)."""
