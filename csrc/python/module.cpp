// fastspec._core: a thin pybind11 layer over the C++ API (csrc/include/fastspec/fastspec.hpp).
// Strict on purpose: the Python package (fastspec.Decoder) converts user input before calling here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cerrno>
#include <optional>

#include "backend.hpp"  // internal: device_plan_dims, for the _cuda_plan test hook
#include "broadening.hpp"  // internal: macroturbulence_transform, for a test hook
#include "device_plan.hpp"
#include "fastspec/fastspec.hpp"

namespace py = pybind11;
using fastspec::Broadening;
using fastspec::Decoder;
using fastspec::Model;

namespace {

template <class T>
using carray = py::array_t<T, py::array::c_style>;

// Accept only a C-contiguous ndarray of exactly dtype T and the given shape; never copy or convert.
template <class T>
carray<T> checked(const py::handle& obj, const char* name, std::vector<py::ssize_t> shape) {
    if (!py::isinstance<py::array>(obj))
        throw py::type_error(std::string(name) + " must be a numpy.ndarray, not " + std::string(py::str(py::type::handle_of(obj).attr("__name__"))));
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!a.dtype().is(py::dtype::of<T>()))
        throw py::type_error(std::string(name) + " must have dtype " + std::string(py::str(py::dtype::of<T>())) + ", not " +
                             std::string(py::str(a.dtype())));
    auto shape_str = [](const std::vector<py::ssize_t>& s) {
        std::string r = "(";
        for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
        return r + (s.size() == 1 ? ",)" : ")");
    };
    std::vector<py::ssize_t> got(a.shape(), a.shape() + a.ndim());
    if (got != shape) throw py::value_error(std::string(name) + " must have shape " + shape_str(shape) + ", not " + shape_str(got));
    if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(name) + " must be C-contiguous");
    return py::reinterpret_borrow<carray<T>>(a);
}

py::array_t<float> copy_of(const float* data, std::vector<py::ssize_t> shape) {
    py::array_t<float> a(shape);
    std::copy(data, data + a.size(), a.mutable_data());
    return a;
}

// vmac: None, or float64 (N,) (checked by the core: finite, in range, and only on a model that has it).
std::optional<carray<double>> vmac_array(const py::object& vmac_obj, py::ssize_t n) {
    if (vmac_obj.is_none()) return std::nullopt;
    return checked<double>(vmac_obj, "vmac", {n});
}

// resolution_factors: None, or float64 (nodes,), one per node of the broadening stage and shared by all rows
// (values checked by the core). Without a stage (nodes = 0) any 1-D array passes, for the core's error naming that.
std::optional<carray<double>> factors_array(const py::object& obj, std::size_t nodes) {
    if (obj.is_none()) return std::nullopt;
    py::ssize_t len = py::ssize_t(nodes);
    if (nodes == 0 && py::isinstance<py::array>(obj) && py::reinterpret_borrow<py::array>(obj).ndim() == 1)
        len = py::reinterpret_borrow<py::array>(obj).shape(0);
    return checked<double>(obj, "resolution_factors", {len});
}

std::optional<carray<double>> factors_array(const Decoder& d, const py::object& obj) {
    return factors_array(obj, d.stage_node_wavelengths().size());
}

py::array_t<double> as_array(const std::vector<double>& v) {
    py::array_t<double> a(py::ssize_t(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
}

py::array_t<float> forward(const Decoder& d, const py::object& labels_obj, const py::object& z_obj, bool clip,
                           const py::object& out_obj, const py::object& vmac_obj, const py::object& factors_obj) {
    const Model& m = d.model();
    if (!py::isinstance<py::array>(labels_obj)) checked<double>(labels_obj, "labels", {});
    const auto la = py::reinterpret_borrow<py::array>(labels_obj);
    if (la.ndim() != 2) throw py::value_error("labels must be 2-D (N, " + std::to_string(m.n_labels()) + "), got " + std::to_string(la.ndim()) + "-D");
    const py::ssize_t n = la.shape(0);
    auto labels = checked<double>(labels_obj, "labels", {n, py::ssize_t(m.n_labels())});
    std::optional<carray<float>> z;
    if (!z_obj.is_none()) z = checked<float>(z_obj, "z", {n, py::ssize_t(m.latent_dim())});
    carray<float> out = out_obj.is_none() ? carray<float>({n, py::ssize_t(m.n_pixels())})
                                          : checked<float>(out_obj, "out", {n, py::ssize_t(m.n_pixels())});
    if (!out.writeable()) throw py::value_error("out must be writeable");
    const auto vmac = vmac_array(vmac_obj, n);
    const auto factors = factors_array(d, factors_obj);
    const double* lp = labels.data();
    const float* zp = z ? z->data() : nullptr;
    const double* vp = vmac ? vmac->data() : nullptr;
    const double* gp = factors ? factors->data() : nullptr;
    float* op = out.mutable_data();
    {
        py::gil_scoped_release release;  // arrays stay alive: we hold references
        d.forward(lp, std::size_t(n), op, zp, clip, vp, gp);
    }
    return out;
}

// (flux (N, P), jacobian (N, P, L)) float32: Decoder::forward_jacobian with fresh arrays; with vmac_column, also
// dF/dvmac (N, P).
py::tuple forward_jacobian(const Decoder& d, const py::object& labels_obj, const py::object& z_obj, bool clip,
                           const py::object& out_obj, const py::object& jac_obj, const py::object& vmac_obj,
                           bool vmac_column, const py::object& factors_obj) {
    const Model& m = d.model();
    if (!py::isinstance<py::array>(labels_obj)) checked<double>(labels_obj, "labels", {});
    const auto la = py::reinterpret_borrow<py::array>(labels_obj);
    if (la.ndim() != 2) throw py::value_error("labels must be 2-D (N, " + std::to_string(m.n_labels()) + "), got " + std::to_string(la.ndim()) + "-D");
    const py::ssize_t n = la.shape(0), np = py::ssize_t(m.n_pixels()), nl = py::ssize_t(m.n_labels());
    auto labels = checked<double>(labels_obj, "labels", {n, nl});
    std::optional<carray<float>> z;
    if (!z_obj.is_none()) z = checked<float>(z_obj, "z", {n, py::ssize_t(m.latent_dim())});
    carray<float> out = out_obj.is_none() ? carray<float>({n, np}) : checked<float>(out_obj, "out", {n, np});
    carray<float> jac = jac_obj.is_none() ? carray<float>({n, np, nl}) : checked<float>(jac_obj, "jac", {n, np, nl});
    if (!out.writeable() || !jac.writeable()) throw py::value_error("out and jac must be writeable");
    const auto vmac = vmac_array(vmac_obj, n);
    const auto factors = factors_array(d, factors_obj);
    std::optional<carray<float>> jv;
    if (vmac_column) jv.emplace(std::vector<py::ssize_t>{n, np});
    const double* lp = labels.data();
    const float* zp = z ? z->data() : nullptr;
    const double* vp = vmac ? vmac->data() : nullptr;
    const double* gp = factors ? factors->data() : nullptr;
    float* op = out.mutable_data();
    float* jp = jac.mutable_data();
    float* jvp = jv ? jv->mutable_data() : nullptr;
    {
        py::gil_scoped_release release;
        d.forward_jacobian(lp, std::size_t(n), op, jp, zp, clip, vp, jvp, gp);
    }
    if (jv) return py::make_tuple(out, jac, *jv);
    return py::make_tuple(out, jac);
}

// The labels of a *_device call: host float64 (N, n_labels), checked like forward()'s.
carray<double> device_labels(const Decoder& d, const py::object& labels_obj, py::ssize_t n) {
    return checked<double>(labels_obj, "labels", {n, py::ssize_t(d.model().n_labels())});
}

// Decoder::forward_device: out, z are device addresses (ints) the Python layer checked (fastspec/_device_arrays.py).
void forward_device(const Decoder& d, const py::object& labels_obj, std::uintptr_t out, std::uintptr_t stream,
                    std::uintptr_t z, bool clip, const py::object& vmac_obj, const py::object& factors_obj) {
    if (!py::isinstance<py::array>(labels_obj)) checked<double>(labels_obj, "labels", {});
    const py::ssize_t n = py::reinterpret_borrow<py::array>(labels_obj).shape(0);
    auto labels = device_labels(d, labels_obj, n);
    const auto vmac = vmac_array(vmac_obj, n);
    const auto factors = factors_array(d, factors_obj);
    const double* lp = labels.data();
    const double* vp = vmac ? vmac->data() : nullptr;
    const double* gp = factors ? factors->data() : nullptr;
    py::gil_scoped_release release;
    d.forward_device(lp, std::size_t(n), reinterpret_cast<float*>(out), stream, reinterpret_cast<const float*>(z), clip,
                     vp, gp);
}

void forward_jacobian_device(const Decoder& d, const py::object& labels_obj, std::uintptr_t out, std::uintptr_t jac,
                             std::uintptr_t stream, std::uintptr_t z, bool clip, const py::object& vmac_obj,
                             std::uintptr_t jac_vmac, const py::object& factors_obj) {
    if (!py::isinstance<py::array>(labels_obj)) checked<double>(labels_obj, "labels", {});
    const py::ssize_t n = py::reinterpret_borrow<py::array>(labels_obj).shape(0);
    auto labels = device_labels(d, labels_obj, n);
    const auto vmac = vmac_array(vmac_obj, n);
    const auto factors = factors_array(d, factors_obj);
    const double* lp = labels.data();
    const double* vp = vmac ? vmac->data() : nullptr;
    const double* gp = factors ? factors->data() : nullptr;
    py::gil_scoped_release release;
    d.forward_jacobian_device(lp, std::size_t(n), reinterpret_cast<float*>(out), reinterpret_cast<float*>(jac), stream,
                              reinterpret_cast<const float*>(z), clip, vp, reinterpret_cast<float*>(jac_vmac), gp);
}

// Broadening::apply over the rows of flux (N, P) with per-row vsini, resolution (and vmac); returns out, or
// (out, d_vsini, d_resolution) with derivatives, (out, d_vsini, d_resolution, d_vmac) when vmac is given too.
py::object broaden(const Broadening& b, const py::object& flux_obj, const py::object& vsini_obj,
                   const py::object& resolution_obj, bool derivatives, const py::object& vmac_obj,
                   const py::object& factors_obj) {
    if (!py::isinstance<py::array>(flux_obj)) checked<float>(flux_obj, "flux", {});
    const auto fa = py::reinterpret_borrow<py::array>(flux_obj);
    if (fa.ndim() != 2) throw py::value_error("flux must be 2-D (N, " + std::to_string(b.n_pixels()) + ")");
    const py::ssize_t n = fa.shape(0), np = py::ssize_t(b.n_pixels());
    auto flux = checked<float>(flux_obj, "flux", {n, np});
    auto vsini = checked<double>(vsini_obj, "vsini", {n});
    auto resolution = checked<double>(resolution_obj, "resolution", {n});
    const auto vmac = vmac_array(vmac_obj, n);
    const auto factors = factors_array(factors_obj, b.node_wavelengths().size());
    carray<float> out({n, np});
    std::optional<carray<float>> dv, dr, dz;
    if (derivatives) dv.emplace(std::vector<py::ssize_t>{n, np}), dr.emplace(std::vector<py::ssize_t>{n, np});
    if (derivatives && vmac) dz.emplace(std::vector<py::ssize_t>{n, np});
    const float* fp = flux.data();
    const double *vp = vsini.data(), *rp = resolution.data(), *zp = vmac ? vmac->data() : nullptr;
    const double* gp = factors ? factors->data() : nullptr;
    float* op = out.mutable_data();
    float* dvp = dv ? dv->mutable_data() : nullptr;
    float* drp = dr ? dr->mutable_data() : nullptr;
    float* dzp = dz ? dz->mutable_data() : nullptr;
    {
        py::gil_scoped_release release;
        for (py::ssize_t i = 0; i < n; ++i)
            b.apply(fp + i * np, vp[i], rp[i], zp ? zp[i] : 0.0, op + i * np, dvp ? dvp + i * np : nullptr,
                    drp ? drp + i * np : nullptr, dzp ? dzp + i * np : nullptr, gp);
    }
    if (!derivatives) return out;
    if (dz) return py::make_tuple(out, *dv, *dr, *dz);
    return py::make_tuple(out, *dv, *dr);
}

}  // namespace

PYBIND11_MODULE(_core, mod) {
    mod.doc() = "fastspec inference core (C++). Use fastspec.Decoder; this module is its strict back end.";

    // fastspec::DeviceError -> DeviceError(RuntimeError); DeviceMemoryError -> DeviceMemoryError(DeviceError, MemoryError).
    static PyObject* device_error =
        PyErr_NewExceptionWithDoc("fastspec._core.DeviceError",
                                  "The CUDA backend cannot be used or a CUDA call failed (the message says which).",
                                  PyExc_RuntimeError, nullptr);
    static PyObject* device_memory_error = [] {
        PyObject* bases = PyTuple_Pack(2, device_error, PyExc_MemoryError);
        PyObject* t = PyErr_NewExceptionWithDoc("fastspec._core.DeviceMemoryError",
                                                "Out of GPU memory; the message names the batch and the bytes.", bases,
                                                nullptr);
        Py_XDECREF(bases);
        return t;
    }();
    if (!device_error || !device_memory_error) throw py::error_already_set();
    mod.attr("DeviceError") = py::handle(device_error);
    mod.attr("DeviceMemoryError") = py::handle(device_memory_error);

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const fastspec::DeviceMemoryError& e) {
            py::set_error(device_memory_error, e.what());
        } catch (const fastspec::DeviceError& e) {
            py::set_error(device_error, e.what());
        } catch (const fastspec::FileAccessError& e) {
            py::set_error(e.errno_value() == ENOENT ? PyExc_FileNotFoundError : PyExc_OSError, e.what());
        } catch (const fastspec::ModelFileError& e) {
            py::set_error(PyExc_ValueError, e.what());
        } catch (const fastspec::InputError& e) {
            py::set_error(PyExc_ValueError, e.what());
        } catch (const fastspec::Error& e) {
            py::set_error(PyExc_ValueError, e.what());
        }
    });

    py::class_<Model>(mod, "Model", "An immutable, validated decoder model (docs/model-format.md).")
        .def_static("load", &Model::load, py::arg("path"), py::call_guard<py::gil_scoped_release>(),
                    "Read and validate a model file. ValueError if invalid, OSError if unreadable.")
        .def_property_readonly("path", &Model::path)
        .def_property_readonly("format_version", &Model::format_version)
        .def_property_readonly("n_labels", &Model::n_labels)
        .def_property_readonly("n_network_labels", &Model::n_network_labels)
        .def_property_readonly("broadening",
                               [](const Model& m) -> py::object {
                                   const auto& b = m.broadening();
                                   if (!b.enabled) return py::none();
                                   return py::dict(py::arg("sampling") = b.sampling == fastspec::Sampling::pixel_mean
                                                                              ? "pixel_mean" : "point",
                                                   py::arg("epsilon") = b.epsilon, py::arg("segments") = b.segments,
                                                   py::arg("vsini_label") = m.labels()[b.vsini_label].name,
                                                   py::arg("resolution_label") = m.labels()[b.resolution_label].name);
                               }, "None, or the broadening stage: {'sampling', 'epsilon', 'segments', 'vsini_label', 'resolution_label'}.")
        .def_property_readonly("latent_dim", &Model::latent_dim)
        .def_property_readonly("n_pixels", &Model::n_pixels)
        .def_property_readonly("wavelength_start", &Model::wavelength_start)
        .def_property_readonly("wavelength_step", &Model::wavelength_step)
        .def_property_readonly("medium", [](const Model& m) { return fastspec::to_string(m.medium()); })
        .def_property_readonly("weight_dtype", [](const Model& m) { return fastspec::to_string(m.weight_dtype()); })
        .def_property_readonly("output_scale", &Model::output_scale)
        .def_property_readonly("output_offset", &Model::output_offset)
        .def_property_readonly("provenance", &Model::provenance_json)
        .def_property_readonly("parameter_count", &Model::parameter_count)
        .def_property_readonly("has_emulator_error", &Model::has_emulator_error)
        .def("emulator_error", [](const Model& m, double vsini, double resolution) -> py::object {
            if (!m.has_emulator_error()) return py::none();
            py::array_t<float> a(py::ssize_t(m.n_pixels()));
            m.emulator_error(vsini, resolution, a.mutable_data());
            return a;
        }, py::arg("vsini"), py::arg("resolution"),
           "RMS of (model - SYNSPEC) per pixel at (vsini, R), measured at export (float32 (n_pixels,)), or None.")
        .def_property_readonly("labels",
                               [](const Model& m) {
                                   py::list out;
                                   for (const auto& l : m.labels())
                                       out.append(py::dict(py::arg("name") = l.name, py::arg("unit") = l.unit,
                                                           py::arg("min") = l.min, py::arg("max") = l.max,
                                                           py::arg("scaling") = fastspec::to_string(l.scaling),
                                                           py::arg("role") = fastspec::to_string(l.role)));
                                   return out;
                               })
        .def_property_readonly("layers",
                               [](const Model& m) {
                                   py::list out;
                                   for (const auto& l : m.layers())
                                       out.append(py::dict(py::arg("in") = l.in, py::arg("out") = l.out,
                                                           py::arg("activation") = fastspec::to_string(l.activation)));
                                   return out;
                               })
        .def("wavelength", [](const Model& m) {
            auto wl = m.wavelength();
            py::array_t<double> a(py::ssize_t(wl.size()));
            std::copy(wl.begin(), wl.end(), a.mutable_data());
            return a;
        }, "Wavelength of every pixel in Å (float64), in the model's medium.")
        .def("weights", [](const Model& m) {
            py::list out;
            for (std::size_t k = 0; k < m.layers().size(); ++k) {
                const auto& l = m.layers()[k];
                out.append(py::make_tuple(copy_of(m.weights(k), {l.out, l.in}), copy_of(m.biases(k), {l.out})));
            }
            return out;
        }, "[(W float32 (out, in), b float32 (out,)), ...]: copies of the weights as the core uses them.")
        .def("__repr__", [](const Model& m) {
            return "<fastspec._core.Model " + m.path() + ": " + std::to_string(m.input_dim()) + " -> " +
                   std::to_string(m.n_pixels()) + ", " + std::to_string(m.layers().size()) + " layers, " +
                   fastspec::to_string(m.weight_dtype()) + ">";
        });

    py::class_<Decoder>(mod, "Decoder", "Runs a Model on the CPU. forward() is thread-safe and releases the GIL.")
        .def(py::init([](const Model& m, int threads, std::size_t max_chunk, bool direct_16bit, const std::string& device,
                         int cuda_device, bool cuda_graphs, bool tf32) {
                 if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
                 if (max_chunk < 1) throw py::value_error("max_chunk must be >= 1");
                 if (device != "cpu" && device != "cuda")
                     throw py::value_error("device must be 'cpu' or 'cuda', not '" + device + "'");
                 fastspec::DecoderOptions o{threads, max_chunk, direct_16bit};
                 o.device = device == "cuda" ? fastspec::Device::cuda : fastspec::Device::cpu;
                 o.cuda_device = cuda_device;
                 o.cuda_graphs = cuda_graphs;
                 o.tf32 = tf32;
                 py::gil_scoped_release release;  // a cuda decoder uploads its weights
                 return std::make_unique<Decoder>(m, o);
             }),
             py::arg("model"), py::arg("threads") = 1, py::arg("max_chunk") = 1024, py::arg("direct_16bit") = true,
             py::arg("device") = "cpu", py::arg("cuda_device") = 0, py::arg("cuda_graphs") = true, py::arg("tf32") = false,
             "threads: OpenBLAS threads (process-global in OpenBLAS; 1 is best on small machines). max_chunk: rows\n"
             "per pass. direct_16bit: batch-1 calls on f16/bf16 models read the 16-bit weights directly (AVX-512F).\n"
             "device: 'cpu' or 'cuda' (DeviceError when the CUDA backend or a GPU is missing); cuda_device: the GPU;\n"
             "cuda_graphs: replay repeated batch sizes from CUDA graphs; tf32: TF32 products for f32 models.")
        .def_property_readonly("device", [](const Decoder& d) { return fastspec::to_string(d.device()); })
        .def_property_readonly("device_description", &Decoder::device_description)
        .def_property_readonly("cuda_device", [](const Decoder& d) { return d.options().cuda_device; })
        .def("forward_device", &forward_device, py::arg("labels"), py::arg("out"), py::arg("stream"), py::arg("z") = 0,
             py::arg("clip") = false, py::arg("vmac") = py::none(), py::arg("resolution_factors") = py::none(),
             "cuda decoders: labels host float64 (N, n_labels); out, z (0: none): device addresses of C-contiguous\n"
             "float32 (N, n_pixels) and (N, latent_dim) on the decoder's GPU; stream: a cudaStream_t. Queued on\n"
             "stream; returns without waiting. vmac: None or host float64 (N,), macroturbulence in km/s;\n"
             "resolution_factors: None or host float64 (n_nodes,), as forward's.")
        .def("forward_jacobian_device", &forward_jacobian_device, py::arg("labels"), py::arg("out"), py::arg("jac"),
             py::arg("stream"), py::arg("z") = 0, py::arg("clip") = false, py::arg("vmac") = py::none(),
             py::arg("jac_vmac") = 0, py::arg("resolution_factors") = py::none(),
             "forward_device plus the Jacobian: jac the device address of float32 (N, n_pixels, n_labels); jac_vmac\n"
             "(0: none) that of float32 (N, n_pixels) for dF/dvmac.")
        .def_property_readonly("uses_direct_16bit", &Decoder::uses_direct_16bit)
        .def_property_readonly("model", &Decoder::model)
        .def_property_readonly("threads", [](const Decoder& d) { return d.options().threads; })
        .def_property_readonly("max_chunk", [](const Decoder& d) { return d.options().max_chunk; })
        .def("forward", &forward, py::arg("labels"), py::arg("z") = py::none(), py::arg("clip") = false,
             py::arg("out") = py::none(), py::arg("vmac") = py::none(), py::arg("resolution_factors") = py::none(),
             "labels: C-contiguous float64 (N, n_labels) in physical units; z: None (z = 0) or C-contiguous\n"
             "float32 (N, latent_dim); out: None or C-contiguous float32 (N, n_pixels); vmac: None (0) or float64\n"
             "(N,), radial-tangential macroturbulence in km/s (format-3 models); resolution_factors: None (ones) or\n"
             "float64 (n_nodes,), node s of the stage takes R * g_s (all rows). Returns out.")
        .def("forward_jacobian", &forward_jacobian, py::arg("labels"), py::arg("z") = py::none(), py::arg("clip") = false,
             py::arg("out") = py::none(), py::arg("jac") = py::none(), py::arg("vmac") = py::none(),
             py::arg("vmac_column") = false, py::arg("resolution_factors") = py::none(),
             "Like forward, plus dF/d(labels) in physical units: returns (flux float32 (N, n_pixels),\n"
             "jac float32 (N, n_pixels, n_labels)), into out/jac when given (C-contiguous float32), and with\n"
             "vmac_column=True a third array, dF/dvmac float32 (N, n_pixels) per km/s.\n"
             "Clamped labels (clip=True) have derivative 0.")
        .def("stage_node_wavelengths", [](const Decoder& d) { return as_array(d.stage_node_wavelengths()); },
             "float64 (n_nodes,): where the broadening stage takes its kernel widths (Å, the model's medium); empty\n"
             "without a stage.");

    py::class_<Broadening>(mod, "Broadening",
                           "Rotation (linear limb darkening epsilon) then a Gaussian of FWHM = lambda/R on a uniform grid:\n"
                           "the broadening stage of version-2 models, on its own. Thread-safe; releases the GIL.")
        .def(py::init([](double start, double step, std::size_t n, double epsilon, int segments, double max_vsini,
                         double min_resolution, const std::string& sampling) {
                 if (sampling != "point" && sampling != "pixel_mean")
                     throw py::value_error("sampling must be 'point' or 'pixel_mean', got '" + sampling + "'");
                 return Broadening(start, step, n, epsilon, segments, max_vsini, min_resolution,
                                   sampling == "point" ? fastspec::Sampling::point : fastspec::Sampling::pixel_mean);
             }),
             py::arg("wavelength_start"), py::arg("wavelength_step"), py::arg("n_pixels"), py::arg("epsilon") = 0.6,
             py::arg("segments") = 8, py::arg("max_vsini") = 300.0, py::arg("min_resolution") = 1000.0,
             py::arg("sampling") = "point",
             "sampling: what the input pixels hold, 'point' samples or 'pixel_mean's (the flux integrated over each\n"
             "pixel); the output is the broadened spectrum at the pixel centres either way.")
        .def(py::init<const Model&>(), py::arg("model"), "The broadening stage of a version-2 model.")
        .def_property_readonly("n_pixels", &Broadening::n_pixels)
        .def("apply", &broaden, py::arg("flux"), py::arg("vsini"), py::arg("resolution"), py::arg("derivatives") = false,
             py::arg("vmac") = py::none(), py::arg("resolution_factors") = py::none(),
             "flux: C-contiguous float32 (N, n_pixels); vsini, resolution (and vmac, radial-tangential macroturbulence\n"
             "in km/s, pixel means only): float64 (N,); resolution_factors: None or float64 (n_nodes,), node s takes\n"
             "resolution * g_s (all rows). Returns the broadened flux, or (flux, d flux/d vsini, d flux/d resolution)\n"
             "with derivatives=True, plus d flux/d vmac when vmac is given.")
        .def_property_readonly("node_wavelengths", [](const Broadening& b) { return as_array(b.node_wavelengths()); },
                               "float64 (n_nodes,): where the stage takes its kernel widths (Å).")
        .def_property_readonly_static("max_vmac", [](py::object) { return Broadening::max_vmac(); },
                                      "The largest macroturbulence the stage takes, km/s.");
    mod.def("_macroturbulence_transform", [](double a) {
        double m, dm;
        fastspec::detail::macroturbulence_transform(a, m, dm);
        return py::make_tuple(m, dm);
    }, py::arg("a"), "Test hook: (M, dM/da) of the radial-tangential profile's transform at a = (pi zeta s)^2.");

    mod.def("cuda_available", &fastspec::cuda_available,
            "Whether device='cuda' can be used: the backend is built, its library loads and a GPU is visible.");
    mod.def("cuda_unavailable_reason", &fastspec::cuda_unavailable_reason,
            "Why device='cuda' cannot be used here ('' when it can).");
    // Test hooks for the CUDA backend's host-side arithmetic (csrc/src/device_plan.hpp; tests/test_cuda_host.py).
    mod.def("_cuda_plan", [](const Model& m, std::size_t n, std::size_t max_chunk, bool jacobian, bool host_output) {
        namespace dp = fastspec::detail::device_plan;
        const dp::Dims d = fastspec::detail::device_plan_dims(m);
        const std::size_t rows = dp::chunk_rows(d, n, max_chunk, jacobian, host_output);
        const dp::Buffers b = dp::buffers(d, rows, jacobian, host_output);
        py::list chunks;
        for (const auto& [r0, r] : dp::chunks(n, rows)) chunks.append(py::make_tuple(r0, r));
        py::dict buffers(py::arg("input") = b.input, py::arg("hidden") = b.hidden, py::arg("logits") = b.logits,
                         py::arg("intrinsic") = b.intrinsic, py::arg("staging_out") = b.staging_out,
                         py::arg("tangent_in") = b.tangent_in, py::arg("tangent_hidden") = b.tangent_hidden,
                         py::arg("tangent_last") = b.tangent_last, py::arg("kernels") = b.kernels,
                         py::arg("lt_workspace") = b.lt_workspace);
        return py::dict(py::arg("rows") = rows, py::arg("chunks") = chunks, py::arg("buffers") = buffers,
                        py::arg("total") = b.total(), py::arg("elem") = d.elem, py::arg("max_half") = d.max_half,
                        py::arg("nodes") = d.nodes);
    }, py::arg("model"), py::arg("n"), py::arg("max_chunk"), py::arg("jacobian"), py::arg("host_output"));
    mod.def("_graph_actions", [](const std::vector<std::pair<std::size_t, bool>>& keys, std::size_t capacity,
                                 const std::vector<std::pair<std::size_t, bool>>& failing) {
        namespace dp = fastspec::detail::device_plan;
        dp::GraphCache<int> cache(capacity);
        std::vector<std::string> out;
        int next = 0;
        for (const auto& [rows, jac] : keys) {
            const dp::GraphKey key{rows, jac};
            const auto a = cache.action(key);
            out.push_back(dp::to_string(a));
            if (a != dp::GraphAction::capture) continue;
            if (std::find(failing.begin(), failing.end(), std::make_pair(rows, jac)) != failing.end())
                cache.failed(key);  // as the backend does when a capture or instantiation fails
            else
                cache.store(key, next++);
        }
        return out;
    }, py::arg("keys"), py::arg("capacity") = 8, py::arg("failing") = std::vector<std::pair<std::size_t, bool>>{},
       "What the CUDA backend's graph cache does for a sequence of (rows, jacobian) calls: 'plain', 'capture', 'replay';\n"
       "the captures of the keys in `failing` fail.");
    mod.def("_bias_path", [](bool has_bias, int status, int found, int first_state) {
        namespace dp = fastspec::detail::device_plan;
        return std::string(dp::to_string(dp::bias_path(has_bias, dp::heuristic_usable(status, found, first_state))));
    }, py::arg("has_bias"), py::arg("status"), py::arg("found"), py::arg("first_state"),
       "Where the CUDA backend applies a layer's bias for a cuBLASLt heuristic answer: 'none', 'fused' or 'kernel'.");
    mod.def("build_info", [] {
        auto b = fastspec::build_info();
        return py::dict(py::arg("version") = b.version, py::arg("blas") = b.blas, py::arg("blas_config") = b.blas_config,
                        py::arg("compiler") = b.compiler, py::arg("cxx_flags") = b.cxx_flags,
                        py::arg("cuda") = b.cuda_compiled);
    });
}
