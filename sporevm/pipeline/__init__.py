"""The whole pipeline of ``spore build``: the build graph (sporevm.build) followed by the
bundle and push stages (over sporevm.dist), run with doit. Above both build and dist."""
