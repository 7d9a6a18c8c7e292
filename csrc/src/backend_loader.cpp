// Finds and loads the CUDA backend library (libfastspec_cuda.so) on first use (until a load succeeds: failures are
// not remembered), so that nothing of CUDA is needed to load the core (a CPU-only machine imports fastspec._core
// and never opens this library).
//
// Where it looks, first hit wins: $FASTSPEC_CUDA_LIBRARY (a path); the folder of the binary that holds this code
// (the Python module fastspec/_core*.so, or an executable or shared library that linked the static core), found
// with dladdr; then the plain name through the dynamic linker's search path (RPATH, LD_LIBRARY_PATH, the install
// prefix's lib folder when that is a system one).
#include <dlfcn.h>

#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "backend.hpp"

#ifndef FASTSPEC_CUDA_LIBRARY_NAME
#define FASTSPEC_CUDA_LIBRARY_NAME "libfastspec_cuda.so"
#endif

namespace fastspec {

namespace detail {

namespace {

struct Loaded {
    const BackendModule* module = nullptr;
    std::string error;  // why it could not be loaded
};

std::string directory_of_this_binary() {
    Dl_info info{};
    if (dladdr(reinterpret_cast<void*>(&directory_of_this_binary), &info) == 0 || !info.dli_fname) return "";
    std::string path = info.dli_fname;
    const auto slash = path.rfind('/');
    return slash == std::string::npos ? std::string(".") : path.substr(0, slash);
}

Loaded load() {
    Loaded r;
#ifndef FASTSPEC_CUDA_COMPILED
    r.error = "this fastspec was built without the CUDA backend (CMake FASTSPEC_CUDA=OFF, or AUTO found no nvcc or "
              "cuBLASLt); rebuild with FASTSPEC_CUDA=ON";
    return r;
#else
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("FASTSPEC_CUDA_LIBRARY"); env && *env) {
        candidates.push_back(env);
    } else {
        const std::string dir = directory_of_this_binary();
        if (!dir.empty()) candidates.push_back(dir + "/" FASTSPEC_CUDA_LIBRARY_NAME);
        candidates.push_back(FASTSPEC_CUDA_LIBRARY_NAME);
    }
    std::string tried;
    for (const auto& path : candidates) {
        void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!handle) {
            const char* e = dlerror();
            tried += "\n  " + path + ": " + (e ? e : "not loadable");
            continue;
        }
        auto fn = reinterpret_cast<fastspec_cuda_backend_module_fn>(dlsym(handle, "fastspec_cuda_backend_module"));
        if (!fn) {
            tried += "\n  " + path + ": has no symbol fastspec_cuda_backend_module";
            dlclose(handle);
            continue;
        }
        const BackendModule* m = fn();
        if (!m || m->abi != kBackendAbi) {
            tried += "\n  " + path + ": backend interface version " + std::to_string(m ? m->abi : -1) +
                     ", this core needs " + std::to_string(kBackendAbi) + " (a library from another build)";
            dlclose(handle);
            continue;
        }
        r.module = m;  // kept loaded for the life of the process
        return r;
    }
    r.error = "the CUDA backend library could not be loaded (set FASTSPEC_CUDA_LIBRARY to its path if it was moved):" +
              tried;
    return r;
#endif
}

// A loaded module is kept for the life of the process; a failure is not: the next call tries again (cuBLASLt may
// have been preloaded since, or FASTSPEC_CUDA_LIBRARY set).
const BackendModule* loaded(std::string& error) {
    static std::mutex mutex;
    static const BackendModule* module = nullptr;
    std::lock_guard<std::mutex> lock(mutex);
    if (!module) {
        Loaded l = load();
        module = l.module;
        error = std::move(l.error);
    }
    return module;
}

}  // namespace

const BackendModule& cuda_backend_module() {
    std::string error;
    const BackendModule* m = loaded(error);
    if (!m) throw DeviceError("device = cuda: " + error);
    return *m;
}

}  // namespace detail

std::string cuda_unavailable_reason() {
    try {
        const auto& m = detail::cuda_backend_module();
        std::string why;
        const int n = m.device_count(&why);
        if (n > 0) return "";
        return n == 0 ? "no CUDA GPU is visible (the driver reports 0 devices; check CUDA_VISIBLE_DEVICES)" : why;
    } catch (const std::exception& e) {
        return e.what();
    }
}

bool cuda_available() noexcept {
    try {
        return cuda_unavailable_reason().empty();
    } catch (...) {
        return false;
    }
}

const char* to_string(Device d) noexcept { return d == Device::cuda ? "cuda" : "cpu"; }

}  // namespace fastspec
