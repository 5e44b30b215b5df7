"""Prints the facts about the installed torch that CMakeLists.txt needs, one KEY=VALUE a line.

Run by CMake at configure time with the Python that pip builds for (no build isolation), so
the extension is compiled against exactly the torch it will be loaded into.
"""
import glob
import os

import torch
from torch.utils import cpp_extension


def main() -> None:
    cuda = torch.version.cuda
    includes = cpp_extension.include_paths()
    torch_dir = os.path.dirname(torch.__file__)
    # pip-installed CUDA torch keeps cuBLAS / cuSPARSE / NVTX headers in nvidia/*/include, which
    # torch's CUDA headers include; the system toolkit may not have them.
    site = os.path.dirname(torch_dir)
    extra = sorted(set(glob.glob(os.path.join(site, "nvidia", "*", "include"))))
    print(f"TORCH_VERSION={torch.__version__}")
    print(f"TORCH_CUDA={cuda}")
    print(f"TORCH_INCLUDE_DIRS={'|'.join(includes)}")
    print(f"TORCH_LIB_DIR={os.path.join(torch_dir, 'lib')}")
    print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    print(f"TORCH_CUDA_EXTRA_INCLUDES={'|'.join(extra)}")


if __name__ == "__main__":
    main()
