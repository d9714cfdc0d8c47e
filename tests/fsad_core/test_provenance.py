import torch

from fsad_core import __version__
from fsad_core.provenance import LIBRARIES, cpu_description, library_versions


def test_library_versions_name_fsad_torch_with_its_build_and_every_installed_library():
    versions = library_versions()
    assert versions["fsad"] == __version__ and versions["torch"] == torch.__version__
    assert set(LIBRARIES) <= set(versions)
    # All of these are dependencies of fsad, so none may be missing here.
    assert all(versions[name] for name in LIBRARIES)


def test_cpu_description_names_the_kernels_instruction_set():
    description = cpu_description()
    assert description.endswith(f"({torch.backends.cpu.get_cpu_capability()})")
    assert len(description) > len(torch.backends.cpu.get_cpu_capability()) + 3
