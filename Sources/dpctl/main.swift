print("dpctl")
