"""The built-in virtual-token methods: prompt tuning (entry point ``prompt``) and prefix tuning (``prefix``).

One package because the two share their virtual-token machinery (``virtual``: the
attention-mask and cache plumbing) and the model-dimension helpers of
``prompt_layout``. Each method's entry point names its ``*_method`` module, so
``ADAPTERKIT_PLUGINS`` can load one without the other. Importing the package or a
method module does not import torch: the ``*_module`` modules (torch) are imported
when a model is touched.
"""
