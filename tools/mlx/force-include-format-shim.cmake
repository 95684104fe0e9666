# Included by linux-cpu.cmake after every project(): force-include the std::format shim in mlx-c's C++
# only (other CMake builds in the workspace, such as ggml's, must not see it).
if(PROJECT_NAME STREQUAL "mlx.data")
  add_compile_options("$<$<COMPILE_LANGUAGE:CXX>:SHELL:-include ${CMAKE_CURRENT_LIST_DIR}/std_format_shim.h>")
endif()
