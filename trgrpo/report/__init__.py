"""`trgrpo report`: run folders (`runs`) → statistics (`stats`) → tables (`tables`) and figures (`plots`)."""
