# The CUDA backend: libfastspec_cuda.so (csrc/src/cuda/), a separate shared library that the core loads with
# dlopen only when a Decoder asks for Device::cuda (csrc/src/backend_loader.cpp), so a CPU-only machine never needs
# it or any CUDA library. Included by CMakeLists.txt after the core library `fastspec` is defined.
#
# FASTSPEC_CUDA: AUTO builds it when nvcc (CUDA >= 12.8) and cuBLASLt are found, ON requires them (FATAL_ERROR
# naming what is missing or too old), OFF skips it.
# cuBLASLt: FASTSPEC_CUBLAS_ROOT (a folder with include/cublasLt.h and lib/libcublasLt.so*), else the PyPI wheel
# nvidia-cublas that Python imports (<site-packages>/nvidia/cu13), else the CUDA toolkit's.
# The CUDA runtime is linked statically; cuBLASLt is found at run time through the RPATH: the nvidia-cublas wheel
# beside the installed package ($ORIGIN/../nvidia/cu13/lib), then the folder found here.
set(FASTSPEC_CUBLAS_ROOT "" CACHE PATH
    "Folder holding include/cublasLt.h and lib/libcublasLt.so* (e.g. <site-packages>/nvidia/cu13); empty: search")
set(FASTSPEC_CUDA_ARCHITECTURES "80;90" CACHE STRING "GPU architectures of the CUDA backend (CMake CUDA_ARCHITECTURES)")

set(FASTSPEC_CUDA_BUILT OFF)
if(NOT FASTSPEC_CUDA STREQUAL "OFF")
  set(_why "")
  # nvcc: CMAKE_CUDA_COMPILER / CUDACXX / PATH, else the toolkit's usual place.
  include(CheckLanguage)
  if(NOT CMAKE_CUDA_COMPILER AND NOT DEFINED ENV{CUDACXX} AND EXISTS /usr/local/cuda/bin/nvcc)
    find_program(_fastspec_nvcc nvcc)
    if(NOT _fastspec_nvcc)
      set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc CACHE FILEPATH "")
    endif()
  endif()
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    set(_why "no CUDA compiler (nvcc) found")
  else()
    # The backend needs CUDA >= 12.8 (cudaStreamGetDevice). The compiler's version, before enable_language.
    execute_process(COMMAND "${CMAKE_CUDA_COMPILER}" --version OUTPUT_VARIABLE _nvcc_version_text
                    RESULT_VARIABLE _nvcc_rc ERROR_QUIET)
    string(REGEX MATCH "release ([0-9]+\\.[0-9]+)" _nvcc_release "${_nvcc_version_text}")
    set(_nvcc_version "${CMAKE_MATCH_1}")
    if(NOT _nvcc_version)
      set(_why "could not read the CUDA version of ${CMAKE_CUDA_COMPILER} (CUDA >= 12.8 is needed)")
    elseif(_nvcc_version VERSION_LESS 12.8)
      set(_why "CUDA ${_nvcc_version} (${CMAKE_CUDA_COMPILER}) is too old: the backend needs CUDA >= 12.8")
    endif()
  endif()

  # cuBLASLt
  set(_cublas_inc "")
  set(_cublas_lib "")
  if(NOT _why)
    set(_roots "")
    if(FASTSPEC_CUBLAS_ROOT)
      list(APPEND _roots "${FASTSPEC_CUBLAS_ROOT}")
    else()
      find_package(Python COMPONENTS Interpreter QUIET)
      if(Python_Interpreter_FOUND)
        execute_process(
          COMMAND "${Python_EXECUTABLE}" -c "
import importlib
for name in ('nvidia.cu13', 'nvidia.cublas'):  # the CUDA 13 wheel layout, then the older one
    try:
        print(list(importlib.import_module(name).__path__)[0])
    except Exception:
        pass"
          OUTPUT_VARIABLE _wheel_roots RESULT_VARIABLE _rc ERROR_QUIET)
        if(_rc EQUAL 0 AND _wheel_roots)
          string(REPLACE "\n" ";" _wheel_roots "${_wheel_roots}")
          list(APPEND _roots ${_wheel_roots})
        endif()
      endif()
    endif()
    foreach(_root IN LISTS _roots)
      file(GLOB _libs "${_root}/lib/libcublasLt.so*" "${_root}/lib64/libcublasLt.so*")
      if(EXISTS "${_root}/include/cublasLt.h" AND _libs)
        list(SORT _libs)
        list(GET _libs 0 _cublas_lib)
        set(_cublas_inc "${_root}/include")
        break()
      endif()
    endforeach()
    if(NOT _cublas_lib AND NOT FASTSPEC_CUBLAS_ROOT)
      find_package(CUDAToolkit QUIET)
      if(TARGET CUDA::cublasLt)
        find_path(_fastspec_cublaslt_h cublasLt.h HINTS ${CUDAToolkit_INCLUDE_DIRS})
        if(_fastspec_cublaslt_h)
          get_target_property(_cublas_lib CUDA::cublasLt IMPORTED_LOCATION)
          set(_cublas_inc "${_fastspec_cublaslt_h}")
        endif()
      endif()
    endif()
    if(NOT _cublas_lib)
      set(_why "no cuBLASLt found (pip install nvidia-cublas, or set FASTSPEC_CUBLAS_ROOT)")
    endif()
  endif()

  if(_why)
    if(FASTSPEC_CUDA STREQUAL "ON")
      message(FATAL_ERROR "FASTSPEC_CUDA=ON, but ${_why}")
    endif()
    message(STATUS "fastspec: CUDA backend not built: ${_why} (FASTSPEC_CUDA=AUTO)")
  else()
    set(FASTSPEC_CUDA_BUILT ON)
  endif()
endif()

if(FASTSPEC_CUDA_BUILT)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)  # the static CUDA runtime
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  get_filename_component(_cublas_libdir "${_cublas_lib}" DIRECTORY)
  add_library(fastspec_cuda SHARED
    csrc/src/cuda/cuda_backend.cpp
    csrc/src/cuda/output_epilogue.cu
    csrc/src/cuda/tangent.cu
    csrc/src/cuda/broaden.cu)
  set_target_properties(fastspec_cuda PROPERTIES
    OUTPUT_NAME fastspec_cuda
    CUDA_ARCHITECTURES "${FASTSPEC_CUDA_ARCHITECTURES}"
    CUDA_RUNTIME_LIBRARY Static
    POSITION_INDEPENDENT_CODE ON
    BUILD_RPATH "${_cublas_libdir}"
    INSTALL_RPATH "$ORIGIN/../nvidia/cu13/lib;$ORIGIN/../nvidia/cublas/lib;${_cublas_libdir}")
  target_include_directories(fastspec_cuda PRIVATE ${PROJECT_SOURCE_DIR}/csrc/include ${PROJECT_SOURCE_DIR}/csrc/src
                             "${_cublas_inc}" ${CUDAToolkit_INCLUDE_DIRS})
  string(REPLACE ";" " " _archs "${FASTSPEC_CUDA_ARCHITECTURES}")
  target_compile_definitions(fastspec_cuda PRIVATE "FASTSPEC_CUDA_ARCHS=\"${_archs}\"")
  target_compile_options(fastspec_cuda PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xptxas=-warn-spills>)
  # One exported symbol (the version script); the static CUDA runtime stays private; nothing of the core is linked
  # (--no-undefined proves it).
  target_link_libraries(fastspec_cuda PRIVATE CUDA::cudart_static "${_cublas_lib}")
  target_link_options(fastspec_cuda PRIVATE
    "LINKER:--version-script=${PROJECT_SOURCE_DIR}/csrc/src/cuda/exports.map" "LINKER:--exclude-libs,ALL"
    "LINKER:--no-undefined")
  target_compile_definitions(fastspec PRIVATE FASTSPEC_CUDA_COMPILED)
  add_dependencies(fastspec fastspec_cuda)  # anything built on the core gets the backend built beside it
  message(STATUS "fastspec: CUDA backend ON: nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${_archs}, "
                 "cuBLASLt ${_cublas_lib}")
  if(SKBUILD OR FASTSPEC_PYTHON)
    install(TARGETS fastspec_cuda LIBRARY DESTINATION fastspec COMPONENT python)  # beside fastspec/_core*.so
  endif()
  if(NOT SKBUILD)
    include(GNUInstallDirs)
    install(TARGETS fastspec_cuda LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
  endif()
endif()
target_link_libraries(fastspec PRIVATE ${CMAKE_DL_LIBS})  # dlopen of the backend
