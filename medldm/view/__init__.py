"""Offline web pages of medldm's outputs (``medldm view``): a dataset's QC table, a training run's curves and
previews, samples with their conditions, an evaluation's verdicts; every volume in NiiVue's 3D viewer."""

from medldm.view.page import DEFAULT_MAX_VOLUMES, folder_kind, write_page, write_page_quietly

__all__ = ["DEFAULT_MAX_VOLUMES", "folder_kind", "write_page", "write_page_quietly"]
