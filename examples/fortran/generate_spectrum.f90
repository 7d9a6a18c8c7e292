! Example: one spectrum from Fortran through the C API (fastspec/fastspec.h) and ISO_C_BINDING.
!   generate_spectrum_f MODEL.fsm TEFF LOGG VSINI MH VMIC R    -> "wavelength flux" per line on stdout
module fastspec_c
  use iso_c_binding
  implicit none
  interface
    integer(c_int) function fastspec_model_load(path, model) bind(c)
      import :: c_int, c_char, c_ptr
      character(kind=c_char), intent(in) :: path(*)
      type(c_ptr), intent(out) :: model
    end function
    subroutine fastspec_model_free(model) bind(c)
      import :: c_ptr
      type(c_ptr), value :: model
    end subroutine
    integer(c_size_t) function fastspec_model_n_pixels(model) bind(c)
      import :: c_size_t, c_ptr
      type(c_ptr), value :: model
    end function
    integer(c_int) function fastspec_model_wavelength(model, wavelength) bind(c)
      import :: c_int, c_ptr, c_double
      type(c_ptr), value :: model
      real(c_double), intent(out) :: wavelength(*)
    end function
    integer(c_int) function fastspec_decoder_new(model, threads, decoder) bind(c)
      import :: c_int, c_ptr
      type(c_ptr), value :: model
      integer(c_int), value :: threads
      type(c_ptr), intent(out) :: decoder
    end function
    subroutine fastspec_decoder_free(decoder) bind(c)
      import :: c_ptr
      type(c_ptr), value :: decoder
    end subroutine
    integer(c_int) function fastspec_forward(decoder, labels, n, flux, clip) bind(c)
      import :: c_int, c_ptr, c_double, c_float, c_size_t
      type(c_ptr), value :: decoder
      real(c_double), intent(in) :: labels(*)
      integer(c_size_t), value :: n
      real(c_float), intent(out) :: flux(*)
      integer(c_int), value :: clip
    end function
    type(c_ptr) function fastspec_last_error() bind(c)
      import :: c_ptr
    end function
  end interface
contains
  ! The library's last message as a Fortran string.
  function last_error() result(msg)
    character(len=:), allocatable :: msg
    character(kind=c_char), pointer :: chars(:)
    integer :: n
    call c_f_pointer(fastspec_last_error(), chars, [4096])
    n = 0
    do while (chars(n + 1) /= c_null_char)
      n = n + 1
    end do
    allocate(character(len=n) :: msg)
    msg = transfer(chars(1:n), msg)
  end function
end module

program generate_spectrum
  use fastspec_c
  implicit none
  type(c_ptr) :: model, decoder
  real(c_double) :: labels(6)
  real(c_double), allocatable :: wave(:)
  real(c_float), allocatable :: flux(:)
  character(len=4096) :: path, arg
  integer :: i
  integer(c_size_t) :: n

  if (command_argument_count() /= 7) then
    write (0, '(a)') 'usage: generate_spectrum_f MODEL.fsm TEFF LOGG VSINI MH VMIC R'
    stop 2
  end if
  call get_command_argument(1, path)
  do i = 1, 6
    call get_command_argument(i + 1, arg)
    read (arg, *) labels(i)
  end do
  if (fastspec_model_load(trim(path) // c_null_char, model) /= 0) call fail()
  if (fastspec_decoder_new(model, 1_c_int, decoder) /= 0) call fail()
  n = fastspec_model_n_pixels(model)
  allocate(wave(n), flux(n))
  if (fastspec_model_wavelength(model, wave) /= 0) call fail()
  if (fastspec_forward(decoder, labels, 1_c_size_t, flux, 0_c_int) /= 0) call fail()
  do i = 1, int(n)
    write (*, '(f10.4, 1x, es15.8)') wave(i), flux(i)
  end do
  call fastspec_decoder_free(decoder)
  call fastspec_model_free(model)
contains
  subroutine fail()
    write (0, '(a)') 'fastspec: ' // last_error()
    stop 1
  end subroutine
end program
