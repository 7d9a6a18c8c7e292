// fastspec._core: a thin pybind11 layer over the C++ API (csrc/include/fastspec/fastspec.hpp).
// Strict on purpose: the Python package (fastspec.Decoder) converts user input before calling here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <optional>

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

py::array_t<float> forward(const Decoder& d, const py::object& labels_obj, const py::object& z_obj, bool clip,
                           const py::object& out_obj) {
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
    const double* lp = labels.data();
    const float* zp = z ? z->data() : nullptr;
    float* op = out.mutable_data();
    {
        py::gil_scoped_release release;  // arrays stay alive: we hold references
        d.forward(lp, std::size_t(n), op, zp, clip);
    }
    return out;
}

// (flux (N, P), jacobian (N, P, L)) float32: Decoder::forward_jacobian with fresh arrays.
py::tuple forward_jacobian(const Decoder& d, const py::object& labels_obj, const py::object& z_obj, bool clip,
                           const py::object& out_obj, const py::object& jac_obj) {
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
    const double* lp = labels.data();
    const float* zp = z ? z->data() : nullptr;
    float* op = out.mutable_data();
    float* jp = jac.mutable_data();
    {
        py::gil_scoped_release release;
        d.forward_jacobian(lp, std::size_t(n), op, jp, zp, clip);
    }
    return py::make_tuple(out, jac);
}

// Broadening::apply over the rows of flux (N, P) with per-row (or scalar) vsini and resolution; returns out, or
// (out, d_vsini, d_resolution) with derivatives.
py::object broaden(const Broadening& b, const py::object& flux_obj, const py::object& vsini_obj,
                   const py::object& resolution_obj, bool derivatives) {
    if (!py::isinstance<py::array>(flux_obj)) checked<float>(flux_obj, "flux", {});
    const auto fa = py::reinterpret_borrow<py::array>(flux_obj);
    if (fa.ndim() != 2) throw py::value_error("flux must be 2-D (N, " + std::to_string(b.n_pixels()) + ")");
    const py::ssize_t n = fa.shape(0), np = py::ssize_t(b.n_pixels());
    auto flux = checked<float>(flux_obj, "flux", {n, np});
    auto vsini = checked<double>(vsini_obj, "vsini", {n});
    auto resolution = checked<double>(resolution_obj, "resolution", {n});
    carray<float> out({n, np});
    std::optional<carray<float>> dv, dr;
    if (derivatives) dv.emplace(std::vector<py::ssize_t>{n, np}), dr.emplace(std::vector<py::ssize_t>{n, np});
    const float* fp = flux.data();
    const double *vp = vsini.data(), *rp = resolution.data();
    float* op = out.mutable_data();
    float* dvp = dv ? dv->mutable_data() : nullptr;
    float* drp = dr ? dr->mutable_data() : nullptr;
    {
        py::gil_scoped_release release;
        for (py::ssize_t i = 0; i < n; ++i)
            b.apply(fp + i * np, vp[i], rp[i], op + i * np, dvp ? dvp + i * np : nullptr, drp ? drp + i * np : nullptr);
    }
    if (!derivatives) return out;
    return py::make_tuple(out, *dv, *dr);
}

}  // namespace

PYBIND11_MODULE(_core, mod) {
    mod.doc() = "fastspec inference core (C++). Use fastspec.Decoder; this module is its strict back end.";

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
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
                                   return py::dict(py::arg("epsilon") = b.epsilon, py::arg("segments") = b.segments,
                                                   py::arg("vsini_label") = m.labels()[b.vsini_label].name,
                                                   py::arg("resolution_label") = m.labels()[b.resolution_label].name);
                               }, "None, or the broadening stage: {'epsilon', 'segments', 'vsini_label', 'resolution_label'}.")
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
        .def(py::init([](const Model& m, int threads, std::size_t max_chunk, bool direct_16bit) {
                 if (threads < 1) throw py::value_error("threads must be >= 1, got " + std::to_string(threads));
                 if (max_chunk < 1) throw py::value_error("max_chunk must be >= 1");
                 return std::make_unique<Decoder>(m, fastspec::DecoderOptions{threads, max_chunk, direct_16bit});
             }),
             py::arg("model"), py::arg("threads") = 1, py::arg("max_chunk") = 1024, py::arg("direct_16bit") = true,
             "threads: OpenBLAS threads (process-global in OpenBLAS; 1 is best on small machines). max_chunk: rows\n"
             "per pass. direct_16bit: batch-1 calls on f16/bf16 models read the 16-bit weights directly (AVX-512F).")
        .def_property_readonly("uses_direct_16bit", &Decoder::uses_direct_16bit)
        .def_property_readonly("model", &Decoder::model)
        .def_property_readonly("threads", [](const Decoder& d) { return d.options().threads; })
        .def_property_readonly("max_chunk", [](const Decoder& d) { return d.options().max_chunk; })
        .def("forward", &forward, py::arg("labels"), py::arg("z") = py::none(), py::arg("clip") = false,
             py::arg("out") = py::none(),
             "labels: C-contiguous float64 (N, n_labels) in physical units; z: None (z = 0) or C-contiguous\n"
             "float32 (N, latent_dim); out: None or C-contiguous float32 (N, n_pixels). Returns out.")
        .def("forward_jacobian", &forward_jacobian, py::arg("labels"), py::arg("z") = py::none(), py::arg("clip") = false,
             py::arg("out") = py::none(), py::arg("jac") = py::none(),
             "Like forward, plus dF/d(labels) in physical units: returns (flux float32 (N, n_pixels),\n"
             "jac float32 (N, n_pixels, n_labels)), into out/jac when given (C-contiguous float32).\n"
             "Clamped labels (clip=True) have derivative 0.");

    py::class_<Broadening>(mod, "Broadening",
                           "Rotation (linear limb darkening epsilon) then a Gaussian of FWHM = lambda/R on a uniform grid:\n"
                           "the broadening stage of version-2 models, on its own. Thread-safe; releases the GIL.")
        .def(py::init<double, double, std::size_t, double, int, double, double>(), py::arg("wavelength_start"),
             py::arg("wavelength_step"), py::arg("n_pixels"), py::arg("epsilon") = 0.6, py::arg("segments") = 8,
             py::arg("max_vsini") = 300.0, py::arg("min_resolution") = 1000.0)
        .def(py::init<const Model&>(), py::arg("model"), "The broadening stage of a version-2 model.")
        .def_property_readonly("n_pixels", &Broadening::n_pixels)
        .def("apply", &broaden, py::arg("flux"), py::arg("vsini"), py::arg("resolution"), py::arg("derivatives") = false,
             "flux: C-contiguous float32 (N, n_pixels); vsini, resolution: float64 (N,). Returns the broadened flux,\n"
             "or (flux, d flux/d vsini, d flux/d resolution) with derivatives=True.");

    mod.def("cuda_available", &fastspec::cuda_available, "False: the CUDA backend is not built yet.");
    mod.def("build_info", [] {
        auto b = fastspec::build_info();
        return py::dict(py::arg("version") = b.version, py::arg("blas") = b.blas, py::arg("blas_config") = b.blas_config,
                        py::arg("compiler") = b.compiler, py::arg("cxx_flags") = b.cxx_flags,
                        py::arg("cuda") = b.cuda_compiled);
    });
}
